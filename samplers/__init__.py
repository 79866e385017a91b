"""fewstep samplers: pure-torch few-step consistency sampling math (LCM, TCD, PCM, Hyper-SD, Lightning).

Nothing in this package imports ``comfy``: the host's ``model_sampling`` object is only used duck-typed
through ``.sigma(t)``, ``.timestep(sigma)`` and ``.sigmas``.
"""
