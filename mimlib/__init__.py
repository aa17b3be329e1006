"""mimscale: a masked-image-modeling data scaling study (SimMIM x SwinV2).

Modules mirror the pipeline stages: ``config`` (study + schema), ``data`` (index, manifests,
decoding, demo data, masks), ``models`` (SwinV2 registry, SimMIM), ``train`` (engines,
checkpoints, schedules, distributed set-up) and ``cli`` (the entry point the workflow calls).
"""

__version__ = "0.1.0"
