"""SmolVLM's special tokens, in the order SmolVLM's tokenizer adds them after SmolLM2's 49152.

Appending them in this order to the SmolLM2 vocabulary gives the ids of the released SmolVLM
checkpoints: `<global-img>` 49152, `<row_1_col_1>`..`<row_6_col_6>` 49153..49188,
`<fake_token_around_image>` 49189, `<image>` 49190, reserved tokens, `<end_of_utterance>` 49279.
"""

GLOBAL_IMAGE = "<global-img>"
FAKE_IMAGE = "<fake_token_around_image>"
IMAGE = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_GRID = 6  # SmolVLM's tokenizer has row/col tokens for up to 6x6 tiles


def row_col_token(row: int, col: int) -> str:
    """`<row_{row}_col_{col}>`, 1-based as in SmolVLM."""
    return f"<row_{row}_col_{col}>"


def smolvlm_added_tokens(base_vocab_size: int = 49152, padded_vocab_size: int = 49280) -> list[str]:
    """The tokens SmolVLM appends to a SmolLM2 vocabulary, padded with reserved tokens so that
    `<end_of_utterance>` lands on the last id (49279 for SmolLM2)."""
    tokens = [GLOBAL_IMAGE]
    tokens += [row_col_token(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    tokens += [FAKE_IMAGE, IMAGE]
    n_reserved = padded_vocab_size - base_vocab_size - len(tokens) - 1
    if n_reserved < 0:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} is too small for SmolVLM's tokens")
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)]
    tokens.append(END_OF_UTTERANCE)
    return tokens
