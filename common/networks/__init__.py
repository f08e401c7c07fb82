"""Paper backbones: the 2D U-Net (ACDC) and the 3D V-Net (LA)."""

from common.networks.outputs import BackboneOutput, EncoderDecoder
from common.networks.sizes import check_input_size, pad_to_divisible, size_divisor
from common.networks.unet2d import UNet2D
from common.networks.vnet3d import VNet3D

__all__ = ["BackboneOutput", "EncoderDecoder", "UNet2D", "VNet3D", "check_input_size", "pad_to_divisible",
           "size_divisor"]
