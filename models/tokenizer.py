"""A small byte-level BPE tokenizer built locally (no download) for tiny models and tests.

It is trained deterministically on a fixed corpus of robot-instruction text, so the same ids come out on every
machine; checkpoints also carry its files.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "In: What action should the robot take to {}?\nOut: ",
    "pick up the apple",
    "pick up the red cube and place it in the bowl",
    "push the cube to the goal region",
    "stack the red cube on top of the green cube",
    "pull the cube towards the robot",
    "open the top drawer",
    "put the bowl on the plate",
    "reach the red target",
    "reach the green target",
    "reach the blue target",
    "reach the yellow target",
    "lift the peg upright",
    "insert the peg into the hole",
    "roll the ball",
    "put both the alphabet soup and the tomato sauce in the basket",
    "turn on the stove",
    "close the microwave",
    "pick up the can",
    "move the gripper to the left",
    "place the sphere in the bin",
    "plug the charger",
]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((line for _ in range(4) for line in _CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast
