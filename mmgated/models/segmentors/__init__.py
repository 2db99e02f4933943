from .gated_encoder_decoder import GatedEncoderDecoder

__all__ = ['GatedEncoderDecoder']
