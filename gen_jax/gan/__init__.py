"""GANs with gradient-normalized discriminators (GN-GAN, GraN-GAN) and the usual baselines.

- `gradient_norm`: `gradient_normalize`, `gran_normalize` (function transforms of f(params, x)),
  `input_grad_norm`, `gradient_penalty` (WGAN-GP).
- `losses`: hinge, non-saturating BCE and WGAN losses, D and G variants.
- `spectral_norm`: pure power-iteration spectral normalization, `SNLinear`/`SNConv`, `update_sn_state`.
- `models`: DCGAN-style CNN and SNGAN ResNet generators/discriminators at 32x32 and 28x28.
"""
from gen_jax.gan.gradient_norm import gradient_normalize, gradient_penalty, gran_normalize, input_grad_norm
from gen_jax.gan.losses import (LOSSES, d_bce_loss, d_hinge_loss, d_wgan_loss, g_bce_loss, g_hinge_loss,
                                g_wgan_loss, get_loss)
from gen_jax.gan.models import (DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator, ResNetGenerator,
                                as_function)
from gen_jax.gan.spectral_norm import (SNConv, SNLinear, SNState, power_iteration, spectral_normalize,
                                       update_sn, update_sn_state)

__all__ = ["gradient_normalize", "gran_normalize", "input_grad_norm", "gradient_penalty", "LOSSES",
           "get_loss", "d_hinge_loss", "g_hinge_loss", "d_bce_loss", "g_bce_loss", "d_wgan_loss",
           "g_wgan_loss", "DCGANGenerator", "DCGANDiscriminator", "ResNetGenerator", "ResNetDiscriminator",
           "as_function", "SNState", "SNLinear", "SNConv", "power_iteration", "spectral_normalize",
           "update_sn", "update_sn_state"]
