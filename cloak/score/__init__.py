"""``cloak score``: metrics on generated (or protected) images, with gates for CI."""

from cloak.registry import Registry

SCORE = Registry("metric")
SCORE.register_lazy("psnr", "cloak.score.fullref:Psnr", "peak signal-to-noise ratio to the same-named reference (dB)")
SCORE.register_lazy("ssim", "cloak.score.fullref:Ssim", "structural similarity to the same-named reference")
SCORE.register_lazy("linf", "cloak.score.fullref:Linf", "largest absolute pixel difference to the reference (/255)")
SCORE.register_lazy("lpips", "cloak.score.perceptual:Lpips", "LPIPS perceptual distance to the same-named reference")
SCORE.register_lazy("fdfr", "cloak.score.faces:Fdfr", "face detection failure rate (RetinaFace or dlib)")
SCORE.register_lazy("ism", "cloak.score.faces:Ism", "identity score: face embedding cosine to the clean mean")
SCORE.register_lazy("idmatch", "cloak.score.faces:IdMatch", "fraction of generations the backend's own same-person "
                    "threshold verifies as the subject")
SCORE.register_lazy("serfiq", "cloak.score.serfiq:SerFiq", "SER-FIQ face image quality (MTCNN + ArcFace dropout head)")
SCORE.register_lazy("ims", "cloak.score.ims:Ims", "DiffShortcut identity score 0.7·IMS_IP + 0.3·IMS_VGG")
SCORE.register_lazy("brisque", "cloak.score.quality:Brisque", "BRISQUE no-reference quality (lower = better)")
SCORE.register_lazy("niqe", "cloak.score.quality:Niqe", "NIQE naturalness (lower = better)")
SCORE.register_lazy("liqe", "cloak.score.clip_iqa:Liqe", "LIQE quality 1–5 (CLIP ViT-B/32 fine-tuned)")
SCORE.register_lazy("clipiqa", "cloak.score.clip_iqa:ClipIqa", "CLIP-IQA: p('Good photo.') with CLIP RN50 (piq)")
SCORE.register_lazy("clipiqa-c", "cloak.score.clip_iqa:ClipIqaC", "class-aware CLIP-IQA: p(good) − p(bad) photo")
