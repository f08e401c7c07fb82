"""Paper backbones: the 2D U-Net (ACDC) and the 3D V-Net (LA)."""

from common.networks.outputs import BackboneOutput, EncoderDecoder
from common.networks.unet2d import UNet2D
from common.networks.vnet3d import VNet3D

__all__ = ["BackboneOutput", "EncoderDecoder", "UNet2D", "VNet3D"]
