"""First-stage training losses. Configs name `ldm.modules.losses.LPIPSWithDiscriminator`."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator  # noqa: F401
from ldm.modules.losses.vqperceptual import DummyLoss, VQLPIPSWithDiscriminator  # noqa: F401
