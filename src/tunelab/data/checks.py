"""Records that are valid but probably not what the user meant: counted in the data summary and warned about.

=========================  ===============================================================================
count                      what it means
=========================  ===============================================================================
``n_ends_with_user``       a conversation whose last turn is the user's: that turn is never trained
``n_empty_response``       an assistant turn with no text: the example trains only the end-of-turn token
``n_identical_pairs``      a preference pair with chosen == rejected: its loss has no signal (DPO: constant)
``n_empty_side``           a preference pair (or unpaired completion) with an empty response
=========================  ===============================================================================

Each warning names the first offending record (``file:line``) and how many there are; nothing is dropped, so a
user who meant it keeps the data as it is.
"""

from __future__ import annotations

from ..console import console


def _blank(message: dict) -> bool:
    return not message["content"].strip()


def conversation_counts(samples) -> dict[str, list[str]]:
    """Origins of SFT samples (`formats.Sample`) per count name."""
    found: dict[str, list[str]] = {"n_ends_with_user": [], "n_empty_response": []}
    for s in samples:
        if not s.messages:
            continue
        if s.messages[-1]["role"] in ("user", "input"):
            found["n_ends_with_user"].append(s.origin)
        if any(m["role"] == "assistant" and _blank(m) for m in s.messages):
            found["n_empty_response"].append(s.origin)
    return found


def pair_counts(pairs) -> dict[str, list[str]]:
    """Origins of preference pairs (`preference.PairSample`) per count name."""
    found: dict[str, list[str]] = {"n_identical_pairs": [], "n_empty_side": []}
    for p in pairs:
        if p.chosen["content"] == p.rejected["content"]:
            found["n_identical_pairs"].append(p.origin)
        if _blank(p.chosen) or _blank(p.rejected):
            found["n_empty_side"].append(p.origin)
    return found


def unpaired_counts(samples) -> dict[str, list[str]]:
    """Origins of unpaired examples (`preference.UnpairedSample`) with an empty completion."""
    return {"n_empty_side": [s.origin for s in samples if _blank(s.completion)]}


WHAT = {"n_ends_with_user": "conversation(s) end with a user turn, which is never trained",
        "n_empty_response": "example(s) have an empty assistant response",
        "n_identical_pairs": "pair(s) have chosen == rejected (no preference signal)",
        "n_empty_side": "example(s) have an empty chosen/rejected response or completion"}


def warn(found: dict[str, list[str]]) -> dict[str, int]:
    """Print one warning per non-empty count (naming the first record); returns the counts for the stats."""
    for key, origins in found.items():
        if origins:
            console.print(f"[yellow]warning: {len(origins)} {WHAT[key]} (first: {origins[0]})[/]")
    return {k: len(v) for k, v in found.items()}


def summary_suffix(stats: dict) -> str:
    """``; 2 end with a user turn, …`` for the data summary line (empty when every count is 0)."""
    short = {"n_ends_with_user": "end with a user turn", "n_empty_response": "empty responses",
             "n_identical_pairs": "chosen == rejected", "n_empty_side": "empty sides"}
    parts = [f"{stats[k]} {v}" for k, v in short.items() if stats.get(k)]
    return "; " + ", ".join(parts) if parts else ""
