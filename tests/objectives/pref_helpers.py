"""Shared data for the preference tests."""


def pair_rows(n: int = 8) -> list[dict]:
    """Pairs with a systematic difference (polite 'Yes' vs curt 'No') a tiny model can pick up in a few steps."""
    return [{"prompt": f"Question number {i}: is {i} a number?", "chosen": f"Yes, {i} is a number.",
             "rejected": "No."} for i in range(n)]
