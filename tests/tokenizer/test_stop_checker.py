"""StopChecker: same answer however the text is split, nothing past a stop, bounded hold-back."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from services.tokenizer.stop_checker import StopChecker


def reference(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Brute force on the whole text: cut at the stop string that is complete first."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stop if text[:end].endswith(s)]
        if ending_here:
            return text[: end - max(len(s) for s in ending_here)], True
    return text, False


def run(stop: Sequence[str], deltas: Sequence[str]) -> tuple[str, bool]:
    """Pushes the deltas, checks the hold-back bound after each, returns (all text, stopped)."""
    checker = StopChecker(stop)
    max_held = max((len(s) for s in stop), default=1) - 1
    emitted, received, stopped = "", "", False
    for delta in deltas:
        out, now_stopped = checker.push(delta)
        assert not (stopped and out), "text released after the stop"
        emitted += out
        received += delta
        stopped = stopped or now_stopped
        if not stopped:
            assert received.startswith(emitted)
            assert len(received) - len(emitted) <= max_held
    return emitted + checker.flush(), stopped


def splits(text: str, num_cuts: int):
    for cuts in itertools.combinations(range(len(text) + 1), num_cuts):
        bounds = (0, *cuts, len(text))
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello world STOP and more", ["STOP"], "Hello world "),
        ("STOP at the very start", ["STOP"], ""),
        ("aab", ["ab"], "a"),  # the first "a" looked like the start of "ab"
        ("aaab", ["aab"], "a"),
        ("ababc", ["abc"], "ab"),
        ("hello world", ["xyz", "world", "lo w"], "hel"),  # earliest occurrence wins
        ("ends with the stop END", ["END"], "ends with the stop "),
        ("汉字🎉停止之后", ["停止"], "汉字🎉"),
    ],
)
def test_stop_found_at_every_split(text, stop, expected):
    for num_cuts in (1, 2):
        for deltas in splits(text, num_cuts):
            assert run(stop, deltas) == (expected, True), deltas
    assert run(stop, list(text)) == (expected, True)


def test_stop_that_completes_first_wins_however_split():
    """With "abcd" and "bc", streaming stops at "bc" before "d" exists; one delta must agree."""
    for deltas in [["abcd"], list("abcd"), *splits("abcd", 1)]:
        assert run(["abcd", "bc"], deltas) == ("a", True), deltas
    assert run(["cd", "abcd"], ["xabcd"]) == ("x", True)  # same end: the longer one cuts


def test_random_texts_and_splits_match_brute_force():
    rng = random.Random(2024)
    for _ in range(3000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 14)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(3)]
        stop = stop[: rng.randint(1, 3)]
        deltas, i = [], 0
        while i < len(text):
            size = rng.randint(0, 4)
            deltas.append(text[i : i + size])
            i += size
        assert run(stop, deltas) == reference(text, stop), (text, stop, deltas)


def test_held_text_is_released_by_flush():
    checker = StopChecker(["world"])
    assert checker.push("Hello wor") == ("Hello ", False)
    assert checker.push("") == ("", False)
    assert checker.flush() == "wor"
    assert checker.flush() == ""


def test_held_text_is_released_once_it_cannot_be_a_stop():
    checker = StopChecker(["world"])
    assert checker.push("Hello wor") == ("Hello ", False)
    assert checker.push("m") == ("worm", False)


def test_nothing_after_the_stop_ever_comes_out():
    checker = StopChecker(["</answer>"])
    assert checker.push("42</ans") == ("42", False)
    assert checker.push("wer> trailing") == ("", True)
    assert checker.push("more text") == ("", True)
    assert checker.flush() == ""


def test_without_a_stop_all_text_comes_out():
    rng = random.Random(3)
    for stop in ([], ["zzz"], ["\n\n", "User:"]):
        for _ in range(200):
            text = "".join(rng.choice("Use r:z\n") for _ in range(rng.randint(0, 30)))
            if any(s in text for s in stop):
                continue
            deltas = [text[i : i + 3] for i in range(0, len(text), 3)]
            assert run(stop, deltas) == (text, False)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])
