"""Small stand-ins shared by tests (imported as ``fakes``: pytest puts tests/ on sys.path)."""


class ListSink:
    """A GroupSink (actors/sampler.py) that keeps the published groups in a list and has no backlog."""

    def __init__(self):
        self.groups = []

    def publish(self, group):
        self.groups.append(group)
        return str(len(self.groups))

    def backlog(self) -> int:
        return 0
