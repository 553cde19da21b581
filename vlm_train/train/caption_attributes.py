"""Per-attribute accuracy of captions of the built-in synthetic sets: colour, shape and (video set) direction.

Exact match says whether a whole caption is right; these say what the model gets wrong. Each object the reference
names is compared with the object in the same place (left to right) of the answer: an attribute counts as right
when the answer names that many objects or more and its object there has the same value. An answer's objects are
read leniently (other words are skipped), a reference's strictly (`parse_caption`), so captions of other data
are not scored. Object count: answers naming as many objects as the reference.
"""

from __future__ import annotations

from collections.abc import Iterable

from vlm_train.data.synthetic_video import caption_objects, parse_caption

ATTRIBUTES = ("colour", "shape", "direction")


def attribute_scores(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """(reference, answer) caption pairs -> heldout_{colour,shape,direction}_acc (share of the references' objects)
    and heldout_object_count_acc (share of captions), each with its count `_n`; attributes no reference has, and
    everything when no reference is a synthetic caption, are left out."""
    right = dict.fromkeys(ATTRIBUTES, 0)
    total = dict.fromkeys(ATTRIBUTES, 0)
    counts_right = captions = 0
    for reference, answer in pairs:
        expected = parse_caption(reference)
        if expected is None:
            continue
        generated = caption_objects(answer)
        captions += 1
        counts_right += len(generated) == len(expected)
        for i, obj in enumerate(expected):
            for attribute, value in obj.items():
                total[attribute] += 1
                right[attribute] += i < len(generated) and generated[i].get(attribute) == value
    if not captions:
        return {}
    scores = {"heldout_object_count_acc": counts_right / captions, "heldout_object_count_acc_n": captions}
    for attribute in ATTRIBUTES:
        if total[attribute]:
            scores[f"heldout_{attribute}_acc"] = right[attribute] / total[attribute]
            scores[f"heldout_{attribute}_acc_n"] = total[attribute]
    return scores
