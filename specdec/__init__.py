"""specdec: lossless speculative decoding for Hugging Face causal language models."""

from specdec.generator import GenerationOutput, GenerationStats, SpeculativeGenerator, StreamChunk
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree

__all__ = ["DraftTree", "GenerationOutput", "GenerationStats", "SamplingParams", "SpeculativeGenerator",
           "StreamChunk"]
__version__ = "0.1.0"
