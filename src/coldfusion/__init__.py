"""coldfusion: collaborative descent (ColD Fusion) for text encoders.

Contributors finetune the current base on their own data; a repository fuses the
finetuned bodies into the next base; repeat.
"""

__version__ = "0.1.0"
