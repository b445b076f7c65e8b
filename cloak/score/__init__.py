"""``cloak score``: metrics on generated (or protected) images, with gates for CI."""

from cloak.registry import Registry

SCORE = Registry("metric")
SCORE.register_lazy("psnr", "cloak.score.fullref:Psnr", "peak signal-to-noise ratio to the same-named reference (dB)")
SCORE.register_lazy("ssim", "cloak.score.fullref:Ssim", "structural similarity to the same-named reference")
SCORE.register_lazy("linf", "cloak.score.fullref:Linf", "largest absolute pixel difference to the reference (/255)")
SCORE.register_lazy("fdfr", "cloak.score.faces:Fdfr", "face detection failure rate (RetinaFace); higher = stronger")
SCORE.register_lazy("ism", "cloak.score.faces:Ism", "identity score: ArcFace cosine to the mean clean embedding")
