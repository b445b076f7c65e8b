"""``cloak protect``: image-level protective perturbations. Methods register lazily here."""

from cloak.registry import Registry

PROTECT = Registry("protect")
PROTECT.register_lazy("aspl", "cloak.protect.aspl:Aspl",
                      "Anti-DreamBooth ASPL: alternate surrogate DreamBooth and PGD (Le+ ICCV'23)")
PROTECT.register_lazy("aspl-lora", "cloak.protect.aspl_lora:AsplLora",
                      "Anti-DreamBooth ASPL against a DreamBooth-LoRA surrogate (rank 4; attacks/aspl_lora.py)")
PROTECT.register_lazy("advdm", "cloak.protect.advdm:AdvDM",
                      "AdvDM: PGD ascent on the frozen LDM's denoising loss (Liang+ ICML'23)")
PROTECT.register_lazy("photoguard", "cloak.protect.photoguard:PhotoGuard",
                      "PhotoGuard encoder attack: pull the VAE latent to a target's (Salman+ ICML'23)")
PROTECT.register_lazy("mist", "cloak.protect.mist:Mist",
                      "Mist: textural + semantic loss, fused (Liang & Wu 2023)")
PROTECT.register_lazy("fsmg", "cloak.protect.fsmg:Fsmg",
                      "Anti-DreamBooth FSMG: PGD against a cached DreamBooth surrogate (Le+ ICCV'23)")
PROTECT.register_lazy("simac", "cloak.protect.simac:Simac",
                      "SimAC: ASPL + greedy timestep selection + feature interference (Wang+ CVPR'24)")
PROTECT.register_lazy("metacloak", "cloak.protect.metacloak:MetaCloak",
                      "MetaCloak: snapshot pool, unrolled learner, EoT transforms (Liu+ CVPR'24)")
PROTECT.register_lazy("dladiff", "cloak.protect.dladiff:DLADiff",
                      "DLADiff: dual surrogates + attention disruption, then PGD vs identity encoders (Jia+ 2025)")
PROTECT.register_lazy("cap", "cloak.protect.cap:Cap",
                      "CAP: cross-image Gram-style consistency plug-in on aspl/fsmg/simac (Wang+ 2025)")
PROTECT.register_lazy("sds-minus", "cloak.protect.sds:SDSMinus",
                      "SDS(−): descend L_dn with the score-distillation gradient, encoder only (Xue+ ICLR'24)")
PROTECT.register_lazy("sds-plus", "cloak.protect.sds:SDSPlus",
                      "SDS(+): ascend L_dn with the score-distillation gradient, encoder only (Xue+ ICLR'24)")
PROTECT.register_lazy("sds-t", "cloak.protect.sds:SDST",
                      "SDS-T: SDS(−) + textural pull to a target (Xue+ ICLR'24)")
PROTECT.register_lazy("pid", "cloak.protect.pid:PID",
                      "PID: push the VAE posterior away from the clean one, encoder only (Li+ ICML'24)")
PROTECT.register_lazy("caat", "cloak.protect.caat:Caat",
                      "CAAT: joint PGD on the images and the cross-attention K/V weights (Xu+ CVPR'24)")
