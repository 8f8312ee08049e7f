// normzoo's C++ extension (normzoo/native.py builds and loads this file). Two things, both to keep Python off a
// call's path: the autograd node, which ties a store kernel's forward and backward AOTInductor packages into autograd
// (the Python autograd.Function it stands in for costs tens of microseconds per forward+backward, most of a small
// input's time), and a layer's fast path, which runs a call whose exact signature store kernels served before
// straight from the layer's forward (normzoo.layers).
#include <torch/extension.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using torch::autograd::tensor_list;
using Loader = torch::inductor::AOTIModelPackageLoader;

// Python's create_graph backward, (token, needs, x, weight, bias, shift, mean_d, rstd, dy) -> (dx, dw, db): set once
// by native.py and never freed, so no Python object is released without the GIL (or after the interpreter ends).
pybind11::object* create_graph_backward = nullptr;

// Each package loaded once per process, shared by the nodes and fast paths that call it (its runner is thread-safe).
std::shared_ptr<Loader> load(const std::string& package) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::weak_ptr<Loader>> loaded;
  std::lock_guard<std::mutex> guard(mutex);
  auto loader = loaded[package].lock();
  if (!loader) {
    loader = std::make_shared<Loader>(package, "model", false, 1, -1);
    loaded[package] = loader;
  }
  return loader;
}

// One signature's kernels for one set of needed gradients (of x, weight, bias).
struct Kernels : torch::CustomClassHolder {
  std::shared_ptr<Loader> forward, backward;
  std::array<bool, 3> needs{};
  at::MemoryFormat layout = at::MemoryFormat::Contiguous;  // x's, and so dy's in the backward kernel's contract
  int64_t token = 0;  // native.py's name for the spec, for the create_graph backward
};

void add(std::vector<at::Tensor>& list, const std::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) list.push_back(*t);
}

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The backward node, written as ATen's generated ones are (a torch::autograd::Function's CppNode costs ~5 us more
// per forward+backward: its VariableInfo records, output wrapping and saved_data map; the README's small-input study).
struct NativeNormBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, bias, shift, mean_d, rstd;
  c10::intrusive_ptr<Kernels> kernels;

  std::string name() const override { return "NativeNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto* v : {&x, &weight, &bias, &shift, &mean_d, &rstd}) v->reset_data();
  }

  tensor_list apply(tensor_list&& grad_outputs) override {
    std::lock_guard<std::mutex> guard(mutex_);
    // unpack() raises torch's own error for a second backward through a freed graph, or for a saved tensor changed
    // in place since the forward (an optimizer step on the weight, say)
    std::array<at::Tensor, 6> saved{x.unpack(), weight.unpack(), bias.unpack(),
                                    shift.unpack(), mean_d.unpack(), rstd.unpack()};
    const auto& needs = kernels->needs;
    tensor_list grads(3);
    const auto& dy = grad_outputs[0];
    if (!dy.defined()) return grads;  // no gradient flowed into y: none flows out
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients, from the engine in Python
      pybind11::gil_scoped_acquire gil;
      auto result = (*create_graph_backward)(
          kernels->token, pybind11::make_tuple(needs[0], needs[1], needs[2]), saved[0], maybe(saved[1]),
          maybe(saved[2]), maybe(saved[3]), maybe(saved[4]), maybe(saved[5]), dy);
      auto tuple = result.cast<pybind11::tuple>();
      for (size_t i = 0; i < 3; ++i) {
        auto g = tuple[i].cast<std::optional<at::Tensor>>();
        if (g.has_value()) grads[i] = *g;
      }
      return grads;
    }
    std::vector<at::Tensor> inputs;
    for (const auto& t : saved) add(inputs, t);
    inputs.push_back(dy.contiguous(kernels->layout));  // sum().backward()'s expanded ones, say
    auto out = kernels->backward->run(inputs);  // the needed gradients, in order
    size_t next = 0;
    for (size_t i = 0; i < 3; ++i) {
      if (!needs[i]) continue;
      TORCH_CHECK(next < out.size(), "normzoo native node: a backward kernel returned too few gradients");
      grads[i] = out[next++];
    }
    return grads;
  }
};

bool has_tangent(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined();
}

// y for a call that needs gradients: the forward kernel, and the node that will run the backward kernel.
at::Tensor apply_node(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, const c10::intrusive_ptr<Kernels>& kernels) {
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    functorch->checkSupportsCppAutogradFunction();  // normzoo.layers keeps torch.func calls off this path
  }
  TORCH_CHECK(!(has_tangent(x) || has_tangent(weight) || has_tangent(bias)),  // the node has no forward derivative
              "normzoo native node: an input carries a forward-mode AD tangent (normzoo.compiling.plain_ops_only "
              "sends such calls to the engine's differentiable ops)");
  std::vector<at::Tensor> inputs{x};
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) add(inputs, *t);
  std::vector<at::Tensor> out;
  {
    at::AutoGradMode no_grad(false);
    out = kernels->forward->run(inputs);  // y, shift, mean_d, rstd
  }
  TORCH_CHECK(out.size() == 4, "normzoo native node: a forward kernel returned ", out.size(), " tensors, not 4");
  const at::Tensor& w = weight.has_value() ? *weight : at::Tensor();
  const at::Tensor& b = bias.has_value() ? *bias : at::Tensor();
  if (!torch::autograd::compute_requires_grad(x, w, b)) return out[0];
  auto node = c10::make_intrusive<NativeNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  node->x = torch::autograd::SavedVariable(x, false);
  node->weight = torch::autograd::SavedVariable(w, false);
  node->bias = torch::autograd::SavedVariable(b, false);
  node->shift = torch::autograd::SavedVariable(out[1], false);
  node->mean_d = torch::autograd::SavedVariable(out[2], false);
  node->rstd = torch::autograd::SavedVariable(out[3], false);
  node->kernels = kernels;
  torch::autograd::set_history(out[0], node);
  return out[0];
}

// What Python holds: the kernels, called as node(x, weight, bias, running_mean, running_var) -> y.
struct Node {
  c10::intrusive_ptr<Kernels> kernels;

  Node(const std::string& forward, const std::string& backward, std::array<bool, 3> needs, const std::string& layout,
       int64_t token)
      : kernels(c10::make_intrusive<Kernels>()) {
    kernels->forward = load(forward);
    kernels->backward = load(backward);
    kernels->needs = needs;
    kernels->token = token;
    if (layout == "channels_last") {
      kernels->layout = at::MemoryFormat::ChannelsLast;
    } else if (layout == "channels_last_3d") {
      kernels->layout = at::MemoryFormat::ChannelsLast3d;
    } else {
      TORCH_CHECK(layout == "contiguous", "normzoo native node: unknown layout ", layout);
    }
  }

  at::Tensor call(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
    return apply_node(x, weight, bias, running_mean, running_var, kernels);
  }
};

// Bumped by native.invalidate() whenever a plan of normzoo.policy could lapse (a kernel leaving a cache, the caches
// cleared, compilation turned off): every fast path then forgets what it learned.
std::atomic<int64_t> epoch{0};

// What a kernel's choice depends on in a tensor argument: defined, sizes, strides, dtype, device.
struct Signature {
  bool defined = false;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::ScalarType::Undefined;
  at::Device device = at::kCPU;

  explicit Signature(const std::optional<at::Tensor>& t) {
    if (!t.has_value() || !t->defined()) return;
    defined = true;
    sizes = t->sizes().vec();
    strides = t->strides().vec();
    dtype = t->scalar_type();
    device = t->device();
  }

  bool matches(const std::optional<at::Tensor>& t) const {
    if (!t.has_value() || !t->defined()) return !defined;
    return defined && t->scalar_type() == dtype && t->device() == device && t->sizes().equals(sizes) &&
           t->strides().equals(strides);
  }
};

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string("\x01unset") : std::string(value);
}

// A layer's calls whose exact signature was served by store kernels before: the kernel for calls without gradients
// (the inference kernel, y alone, or the forward kernel where that serves them), and per set of needed gradients the
// node, called with no Python in between. A miss (returns None) sends the call the Python way, which teaches the fast
// path what served it (normzoo.policy.run).
struct FastPath {
  struct Entry {
    Signature x, weight, bias, running_mean, running_var;  // the running statistics of a BatchNorm in eval, read only
    bool inference_mode;
    std::shared_ptr<Loader> inference;  // the kernel for calls that need no gradient (null: not taught yet)
    std::array<c10::intrusive_ptr<Kernels>, 8> nodes;  // by needs: x | weight << 1 | bias << 2
  };
  static constexpr size_t kMaxEntries = 16;  // signatures kept per layer (batch sizes in turn, say)
  std::mutex mutex;
  std::vector<std::shared_ptr<Entry>> entries;
  int64_t seen_epoch = -1;
  std::string env_compile, env_dynamic;  // what the entries were learned under

  std::shared_ptr<Entry> find(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var, bool inference_mode) {
    for (const auto& e : entries) {
      if (e->inference_mode == inference_mode && e->x.matches(x) && e->weight.matches(weight) &&
          e->bias.matches(bias) && e->running_mean.matches(running_mean) && e->running_var.matches(running_var)) {
        return e;
      }
    }
    return nullptr;
  }

  bool current() {  // under the mutex: forget everything learned under another epoch or setting
    if (seen_epoch == epoch.load() && env_compile == env("NORMZOO_COMPILE") &&
        env_dynamic == env("NORMZOO_DYNAMIC_BATCH")) {
      return true;
    }
    entries.clear();
    return false;
  }

  std::optional<at::Tensor> call(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var) {
    // inside a torch.func transform, or with a forward-mode AD tangent on an input: the Python way (the engine's
    // differentiable ops). Checked here, not in the layer's Python, where it cost about 0.2-0.5 us of a 10 us call.
    // (functorch includes its front-mode key in the thread's dispatch keys while any transform's layer is pushed)
    if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
        has_tangent(x) || has_tangent(weight) || has_tangent(bias)) {
      return std::nullopt;
    }
    std::shared_ptr<Entry> e;
    {
      std::lock_guard<std::mutex> guard(mutex);
      if (!current()) return std::nullopt;
      e = find(x, weight, bias, running_mean, running_var, c10::InferenceMode::is_enabled());
    }
    if (!e) return std::nullopt;
    bool w = weight.has_value() && weight->defined() && weight->requires_grad();
    bool b = bias.has_value() && bias->defined() && bias->requires_grad();
    if (at::GradMode::is_enabled() && (x.requires_grad() || w || b)) {
      const auto& node = e->nodes[(x.requires_grad() ? 1 : 0) | (w ? 2 : 0) | (b ? 4 : 0)];
      if (!node) return std::nullopt;
      return apply_node(x, weight, bias, running_mean, running_var, node);
    }
    if (!e->inference) return std::nullopt;  // none taught yet: the Python way asks for it
    std::vector<at::Tensor> inputs{x};
    for (const auto* t : {&weight, &bias, &running_mean, &running_var}) add(inputs, *t);
    return e->inference->run(inputs)[0];
  }

  void learn(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
             const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
             const std::string& inference, const std::vector<std::pair<std::array<bool, 3>, Node*>>& nodes) {
    std::lock_guard<std::mutex> guard(mutex);
    if (!current()) {
      seen_epoch = epoch.load();
      env_compile = env("NORMZOO_COMPILE");
      env_dynamic = env("NORMZOO_DYNAMIC_BATCH");
    }
    bool inference_mode = c10::InferenceMode::is_enabled();
    auto e = find(x, weight, bias, running_mean, running_var, inference_mode);
    if (!e) {
      if (entries.size() >= kMaxEntries) entries.erase(entries.begin());
      e = std::make_shared<Entry>(Entry{Signature(x), Signature(weight), Signature(bias), Signature(running_mean),
                                        Signature(running_var), inference_mode, nullptr, {}});
      entries.push_back(e);
    }
    if (!inference.empty()) e->inference = load(inference);
    for (const auto& [needs, node] : nodes) {
      e->nodes[(needs[0] ? 1 : 0) | (needs[1] ? 2 : 0) | (needs[2] ? 4 : 0)] = node->kernels;
    }
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Node>(m, "Node")
      .def(pybind11::init<const std::string&, const std::string&, std::array<bool, 3>, const std::string&,
                          int64_t>())
      .def("__call__", &Node::call, pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<FastPath>(m, "FastPath")
      .def(pybind11::init<>())
      .def("__call__", &FastPath::call, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
           pybind11::arg("running_mean") = pybind11::none(), pybind11::arg("running_var") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("learn", &FastPath::learn)
      .def("__len__", [](FastPath& self) {
        std::lock_guard<std::mutex> guard(self.mutex);
        return self.current() ? self.entries.size() : 0;
      });
  m.def("invalidate", [] { epoch.fetch_add(1); });
  m.def("set_create_graph_backward", [](pybind11::object f) {
    if (create_graph_backward == nullptr) create_graph_backward = new pybind11::object(std::move(f));
  });
}
