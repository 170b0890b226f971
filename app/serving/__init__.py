"""Planning, running and watching a deployment's engines: models resolved, GPUs placed, a plan computed (pure), then
carried out — engines supervised, models sharing GPUs put to sleep and woken, the idle policy, shutdown."""
