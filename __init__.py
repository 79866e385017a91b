"""fewstep: few-step Stable Diffusion for ComfyUI. Registration only; see README.md."""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import FewStepExtension

    return FewStepExtension()
