# The shipped YAML files (layers, equivalence and speed sweeps); installed as the package normzoo.configs.
