"""``cloak purify``: remove protective perturbations, to test how much of a protection survives."""

from cloak.registry import Registry

PURIFY = Registry("purify")
PURIFY.register_lazy("gaussian", "cloak.purify.classic:Gaussian", "Gaussian blur (kernel 5, σ 1.1; --compat: PIL radius 5)")
PURIFY.register_lazy("jpeg", "cloak.purify.classic:Jpeg", "JPEG re-compression (quality 75)")
PURIFY.register_lazy("tvm", "cloak.purify.tvm:TVM", "TV minimisation, 2% pixel dropout at 64², PDHG, SD×4 up")
PURIFY.register_lazy("diffpure", "cloak.purify.diffpure:DiffPure",
                     "pixel DiffPure: guided-diffusion SDEdit, t=100/1000")
PURIFY.register_lazy("ldiffpure", "cloak.purify.ldiffpure:LatentDiffPure",
                     "latent DiffPure: SD 1.4 SDEdit, t=300, CFG 7.5")
PURIFY.register_lazy("ddspure", "cloak.purify.diffpure:DDSPure", "denoised smoothing: SDEdit at ᾱ_t* = 1/(1+σ²)")
PURIFY.register_lazy("gridpure", "cloak.purify.diffpure:GrIDPure", "GrIDPure: 20× tiled DiffPure t=10, γ=0.1")
PURIFY.register_lazy("impress", "cloak.purify.impress:Impress",
                     "IMPRESS: VAE consistency + LPIPS bound, Adam on pixels")
PURIFY.register_lazy("diffshortcut", "cloak.purify.diffshortcut:DiffShortcut",
                     "DiffShortcut: CodeFormer w=0.5, then SD ×4 from ¼")
PURIFY.register_lazy("pdm-pure", "cloak.purify.pdm_pure:PDMPure",
                     "PDM-Pure: DeepFloyd IF-II SDEdit (t=44, 10 steps from t=99), then SD ×4")
PURIFY.register_lazy("noisy-upscale", "cloak.purify.noisy_upscale:NoisyUpscaling",
                     "Noisy Upscaling: Gaussian σ 0.1, then SD ×4 told noise level 320, resized back")
