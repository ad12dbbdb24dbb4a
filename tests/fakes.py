"""Small stand-ins shared by tests (imported as ``fakes``: pytest puts tests/ on sys.path)."""

from diffrl.actors.sampler import ListSink  # noqa: F401  (the in-memory GroupSink, re-exported for tests)


class InProcessScorer:
    """The real compressibility scorer called in-process, as a sampler's GroupScorer (the HTTP path is
    test_sampler's)."""

    def __init__(self):
        from diffrl.reward_servers.scorers import get_scorer

        self.scorer = get_scorer("compressibility")

    def score_groups(self, groups):
        from diffrl.reward_servers.client import GroupScores

        out = []
        for g in groups:
            n = len(g.images)
            scores, _ = self.scorer.score_batch(list(g.images), [g.prompt] * n, [{}] * n)
            out.append(GroupScores(scores={"compressibility": scores}, combined=scores))
        return out
