"""Pending prefixes: what the router may count on before a step has cached anything."""

from services.scheduler.pending_prefixes import PendingPrefixes


def test_overlap_of_routed_but_uncomputed_prompts() -> None:
    pending = PendingPrefixes(block_size=4, model_version="v1")
    prompt = list(range(10, 30))  # 5 full blocks
    assert pending.overlap_tokens(prompt, "") == 0
    pending.add("a", prompt, "")
    assert pending.overlap_tokens(prompt, "") == 20
    assert pending.overlap_tokens(prompt[:9] + [99] * 11, "") == 8  # shares two full blocks
    assert pending.overlap_tokens(prompt, "other-salt") == 0
    pending.add("b", prompt[:12], "")
    pending.remove("a")
    assert pending.overlap_tokens(prompt, "") == 12  # b still pending
    pending.remove("b")
    pending.remove("b")  # idempotent
    assert pending.overlap_tokens(prompt, "") == 0 and len(pending) == 0
