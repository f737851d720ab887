"""The public names of :mod:`jit_sampler.pipelines`, each with the module there that defines it.

The one list of them: :mod:`jit_sampler.pipelines` exports these names (``__all__``) and loads
each from its module on first use; :mod:`jit_sampler` re-exports the same names and imports
the pipelines package only when one is asked for. This module imports nothing, so that
``import jit_sampler`` does not import diffusers.
"""

PIPELINE_EXPORTS: dict[str, str] = {
    # the JiT pipelines, and the velocity wrappers the model families add
    "JiTFluxPipeline": "flux",
    "JiTFlux2KleinPipeline": "flux2_klein",
    "JiTFluxKontextPipeline": "flux_kontext",
    "JiTFlux2KleinKVPipeline": "flux2_klein_kv",
    "JiTQwenImagePipeline": "qwen_image",
    "QwenImageVelocity": "qwen_image",
    "JiTFluxImg2ImgPipeline": "flux_img2img",
    "JiTFluxInpaintPipeline": "flux_img2img",
    "JiTFluxFillPipeline": "flux_fill",
    "JiTFluxControlNetPipeline": "flux_controlnet",
    "FluxControlNetVelocity": "flux_controlnet",
    "JiTStableDiffusion3Pipeline": "sd3",
    "SD3Velocity": "sd3",
    # the shared pieces
    "enable_jit": "base",
    "FluxVelocity": "velocity",
    "AnchorAttnProcessor": "attention_processor",
    "install_anchor_attention": "attention_processor",
    "remove_anchor_attention": "attention_processor",
    "use_anchor_attention": "attention_processor",
    # RAS
    "RASFluxPipeline": "ras_pipelines",
    "FluxRASVelocity": "ras_pipelines",
    "enable_ras": "ras_pipelines",
    "use_ras_attention": "ras_attention",
    # cache-dit integration (the cache-dit package itself is imported on first use)
    "enable_cache_dit": "cache_dit",
    "disable_cache_dit": "cache_dit",
    "use_cache_dit": "cache_dit",
}
