"""Planning a cluster run before paying for it: the papers' models at real size on the meta device
(:mod:`~blip2.planning.presets`), one step of each job traced on fake tensors
(:mod:`~blip2.planning.measure`, :mod:`~blip2.planning.steps`), and memory, largest batch, FLOPs, time and
GPU-hours from them (:mod:`~blip2.planning.plan`). ``blip2 plan`` prints it."""
