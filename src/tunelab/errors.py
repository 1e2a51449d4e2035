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
