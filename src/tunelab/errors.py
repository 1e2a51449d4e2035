"""User-facing errors.

Every mistake a user can make (bad config key, malformed record, unknown template, model not found, a
target pattern that matches nothing…) raises `TunelabError` with ONE line naming the culprit — with
`file:line` where one applies. The CLI prints it as `error: …` and exits with status 2, no traceback.
Bugs in tunelab itself stay ordinary exceptions so they keep their tracebacks.
"""


class TunelabError(Exception):
    """An error caused by user input; its message is shown as a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class TunelabErrors(TunelabError):
    """Several user errors found in one pass (every invalid key of a config): the CLI prints one line for each;
    as a string they are joined with "; " (one line, for callers that prefix their own context)."""

    def __init__(self, messages: list[str]):
        self.messages = [" ".join(str(m).split("\n")) for m in messages]
        super().__init__("; ".join(self.messages))
