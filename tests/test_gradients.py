"""The hand-written backward (engine._Normalize) against numerical gradients, in float64."""

import pytest
import torch

import normzoo.functional as NF

D = torch.float64


def _x(*shape):
    return (torch.randn(*shape, dtype=D) * 2 + 3).requires_grad_()


def _p(n):
    return (torch.rand(n, dtype=D) + 0.5).requires_grad_(), torch.randn(n, dtype=D).requires_grad_()


rm, rv = torch.rand(6, dtype=D), torch.rand(6, dtype=D) + 0.5
CASES = {
    "group_norm": (lambda x, w, b: NF.group_norm(x, 3, w, b, compile=False), (3, 6, 4, 5), 6),
    "group_norm_silu": (lambda x, w, b: NF.group_norm(x, 2, w, b, activation="silu", compile=False), (2, 6, 3, 4), 6),
    "group_norm_gelu_3d": (lambda x, w, b: NF.group_norm(x, 3, w, b, activation="gelu", compile=False),
                           (2, 6, 2, 3, 2), 6),
    "instance_norm": (lambda x, w, b: NF.instance_norm(x, None, None, w, b, compile=False), (3, 6, 7), 6),
    "batch_norm": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, True, compile=False), (3, 6, 4, 5), 6),
    "batch_norm_relu": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, True, activation="relu", compile=False),
                        (4, 6, 3), 6),
    "batch_norm_eval": (lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, False, compile=False), (3, 6, 4, 5), 6),
    "batch_norm_1d": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, True, compile=False), (5, 6), 6),
    "layer_norm": (lambda x, w, b: NF.layer_norm(x, (6,), w, b, compile=False), (3, 4, 6), 6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name):
    f, shape, c = CASES[name]
    w, b = _p(c)
    assert torch.autograd.gradcheck(f, (_x(*shape), w, b), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda x: f(x, None, None), (_x(*shape),), atol=1e-6, rtol=1e-5)


def test_gradcheck_layer_norm_over_two_dims():
    w, b = (torch.rand(4, 6, dtype=D) + 0.5).requires_grad_(), torch.randn(4, 6, dtype=D).requires_grad_()
    f = lambda x, w, b: NF.layer_norm(x, (4, 6), w, b, activation="gelu_tanh", compile=False)  # noqa: E731
    assert torch.autograd.gradcheck(f, (_x(3, 4, 6), w, b), atol=1e-6, rtol=1e-5)
