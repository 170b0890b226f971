"""SGLang as the app runs it: each model's command line (a typed spec, rendered last), its own API, its router for
replicas, the CPU development mode, and how an engine process starts (docs/sglang.md)."""
