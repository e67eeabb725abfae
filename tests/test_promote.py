"""The promotion gate: evidence, not luck."""

from pipeline import promote


def _evaluation(score: float, answered: int, holdout: int = 200) -> dict:
    return {"holdout_calls": holdout, "score_vs_baseline": score, "confidence_threshold": 0.5,
            "score_at_threshold": score, "answered_at_threshold": answered}


def test_the_lower_bound_is_wilsons_and_shrinks_to_the_mean_with_more_calls():
    # Wilson's one-sided 95% bound for 9 of 10: (0.9 + 1.645^2/20 - 1.645*sqrt(0.009 + 1.645^2/400)) / (1 + 1.645^2/10)
    assert abs(promote.quality_lower_bound(0.9, 10, 0.95) - 0.6521) < 1e-3
    bounds = [promote.quality_lower_bound(0.9, n, 0.95) for n in (10, 100, 1000, 100000)]
    assert bounds == sorted(bounds) and 0.898 < bounds[-1] < 0.9
    assert promote.quality_lower_bound(1.0, 4, 0.95) < 0.6  # four perfect answers prove little
    assert promote.quality_lower_bound(0.9, 100, 0.99) < promote.quality_lower_bound(0.9, 100, 0.95)
    assert promote.quality_lower_bound(0.5, 0, 0.95) == 0.0


def test_a_small_lucky_holdout_is_not_promoted_and_the_same_score_on_many_calls_is():
    decision, reason = promote.promotion_decision(_evaluation(0.9, 10), quality_floor=0.8, min_holdout=10)
    assert decision == promote.NOT_PROMOTED and "lower bound 0.652" in reason
    decision, reason = promote.promotion_decision(_evaluation(0.9, 200), quality_floor=0.8, min_holdout=10)
    assert decision == promote.PROMOTED and "on the 200 calls it would answer" in reason


def test_a_model_worse_than_the_floor_is_never_promoted_however_many_calls():
    for answered in (10, 100, 10_000):
        decision, _ = promote.promotion_decision(_evaluation(0.79, answered), quality_floor=0.8, min_holdout=10)
        assert decision == promote.NOT_PROMOTED
    no_threshold = {**_evaluation(0.95, 0), "confidence_threshold": None}
    assert promote.promotion_decision(no_threshold, 0.8, 10)[0] == promote.NOT_PROMOTED
    assert promote.promotion_decision(_evaluation(1.0, 9, holdout=9), 0.8, 10)[0] == promote.NOT_PROMOTED
    assert promote.promotion_decision(None, 0.8, 10) == (promote.NOT_PROMOTED, "not fine-tuned")
