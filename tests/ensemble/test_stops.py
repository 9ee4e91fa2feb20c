from __future__ import annotations

from fuseflow.ensemble.stops import find_stop, stop_holdback


def reference_holdback(text: str, stops) -> int:
    return max([k for s in stops for k in range(len(s)) if k <= len(text) and text.endswith(s[:k])] + [0])


def test_find_stop_earliest_and_only_after_search_from():
    assert find_stop("abc\nde###", ["###", "\n"]) == 3
    assert find_stop("ab###cd", ["###"], search_from=4) == 2  # an occurrence straddling the checked part counts
    assert find_stop("###abc", ["###"], search_from=6) is None
    assert find_stop("abc", []) is None


def test_stop_holdback_matches_reference():
    stops = ["Question:", "\n\n", "END"]
    for text in ["", "abc", "abc\n", "foo Quest", "Question", "xEN", "E", "Questio\n"]:
        assert stop_holdback(text, stops) == reference_holdback(text, stops), text
