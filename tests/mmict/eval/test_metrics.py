"""Reference metrics, checked against values worked out by hand from the reference code (vqaEval.py, OpenFlamingo's
ok_vqa_utils.py, pycocoevalcap, sklearn's roc_auc_score). The Java-backed ones (PTB tokenizer, METEOR) share one
corpus and one METEOR start, since a JVM start costs seconds."""

from __future__ import annotations

import math
import re
import shutil

import pytest

from mmict.eval import metrics
from mmict.eval.metrics import (
    MissingNLTKResourceError,
    caption_metrics,
    cider,
    exact_match,
    hateful_memes_auc,
    normalize_vqa_answer,
    okvqa_postprocess,
    okvqa_stem,
    p_yes_from_loglikelihoods,
    vqa_accuracy,
)
from mmict.eval.postprocess import postprocess_vqa

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer / METEOR need Java")


# ------------------------------------------------------------------------------------------------ VQA normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),  # manualMap: number words -> digits
        ("Two Dogs", "2 dogs"),  # lower-cased first
        ("none", "0"),
        ("  Ten\n", "10"),  # newline -> space, then strip
        ("the cat", "cat"),  # articles dropped
        ("an apple", "apple"),
        ("1,000", "1000"),  # digit,digit: the comma is deleted, not turned into a space
        ("cats,dogs", "cats dogs"),  # no digit,digit and no space next to it: the comma becomes a space
        ("a,b", "b"),  # ... and then "a" is an article
        ("yes, it is", "yes it is"),  # ", " has a space next to it: deleted
        ("1,000 a-b", "1000 ab"),  # one digit,digit anywhere deletes every mark, so "-" too
        ("hot-dog", "hot dog"),
        ("well - known", "well known"),
        # Adjacency is judged on the input text: ";" -> " " makes "a -b", yet "-" still counts as not next to a
        # space, so every "-" becomes a space ("c-d" -> "c d"), not deleted ("cd").
        ("a;-b c-d", "b c d"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("end.", "end"),  # any other period goes
        ("a.b", "ab"),
        ("yes?", "yes"),
        ('"quoted"', "quoted"),
        ("It's", "it's"),  # the apostrophe is not in the punct list
        ("dont", "don't"),  # contractions restored
        ("Dont", "don't"),
        ("Im", "im"),  # the table's key is "Im", but the text is lower-cased before the lookup: never matches
        ("x" + "." * 40, "x" + "." * 8),  # re.UNICODE passed as sub()'s count: only 32 periods are removed
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# -------------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        # 10 answers, k of them equal to the prediction. Dropping one of the k leaves k-1 matches, dropping one of
        # the 10-k others leaves k; each subset scores min(1, matches/3); average over the 10 subsets:
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 18/30 = 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, 1.0),  # every subset keeps >= 3 matches
    ],
)
def test_vqa_accuracy_leave_one_out(n_match, expected):
    answers = ["dog"] * n_match + [f"other{i}" for i in range(10 - n_match)]
    assert vqa_accuracy("dog", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides():
    # "Two." and "two" both normalise to "2": 3 of 10 match -> 0.9 (from the table above).
    assert vqa_accuracy("Two.", ["2", "two", "Two"] + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("a red car", ["red car"] * 4 + ["blue"] * 6) == 1.0


def _openflamingo_style_accuracy(prediction: str, answers: list[str]) -> float:
    # What OpenFlamingo computes when answers carry no answer_id (VizWiz, TextVQA): `item != gtAnsDatum` on equal
    # dicts removes every copy of the dropped answer at once.
    pred = normalize_vqa_answer(prediction)
    norm = [normalize_vqa_answer(a) for a in answers]
    accs = [min(1.0, sum(o == pred for o in norm if o != a) / 3) for a in norm]
    return sum(accs) / len(accs)


def test_vqa_accuracy_removes_by_position_not_by_value():
    answers = ["dog", "dog"] + [f"other{i}" for i in range(8)]
    # By position (ours, the official code's): 2 subsets with 1 match, 8 with 2 -> 0.6.
    assert vqa_accuracy("dog", answers) == pytest.approx(0.6)
    # By value (OpenFlamingo without ids): dropping either "dog" drops both -> 0 matches; 8 subsets with 2 -> 16/30.
    assert _openflamingo_style_accuracy("dog", answers) == pytest.approx(16 / 30)


def test_vqa_accuracy_any_number_of_answers():
    # OK-VQA: 5 answers each listed twice. "cat" appears twice, so as in the 2-of-10 case: 0.6.
    okvqa = [a for a in ["cat", "kitten", "feline", "pet", "tabby"] for _ in range(2)]
    assert vqa_accuracy("cat", okvqa) == pytest.approx(0.6)
    # 3 answers, all matching: each subset keeps 2 matches -> 2/3.
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_existing_light_metrics_unchanged():
    assert postprocess_vqa("a dog, probably Question: what") == "a dog"
    assert exact_match("The Dog!", ["dog"]) == 1.0
    assert exact_match("cat", ["dog"]) == 0.0


# ------------------------------------------------------------------------------------------------------- OK-VQA


def test_okvqa_stem_rules_on_tagged_words():
    """The stemming rules after tokenising/tagging (which need NLTK data): the POS tags are given here, as NLTK's
    tagger would give them. The lemmatizer passed in records what reaches it, to check which words are routed to
    WordNet's verb lemmatizer (the lemmas themselves need WordNet: see the data-backed test below)."""
    seen: list[str] = []

    def lemmatize_verb(word: str) -> str:
        seen.append(word)
        return f"<lemma:{word}>"

    tagged = [
        ("dogs", "NNS"),  # plural noun -> inflection.singularize
        ("buses", "NNS"),
        ("Americans", "NNPS"),
        ("are", "VBP"),  # manual match to itself
        ("jumping", "VBG"),  # "-ing" -> WordNet verb lemma
        ("ceiling", "NN"),  # "-ing" whatever its tag
        ("riding", "VBG"),  # "-ing" but in the manual table: never reaches WordNet
        ("christmas", "NNS"),  # manual: singularize would make it "christma"
        ("jeans", "NNS"),  # manual: -> "jean"
        ("leaves", "VBZ"),  # manual: -> "leaf" whatever the tag
        ("glass", "NN"),  # singular noun: unchanged
        ("runs", "VBZ"),  # not a noun: unchanged
    ]
    out = metrics._okvqa_stem_tagged(tagged, lemmatize_verb)
    assert out == (
        "dog bus American are <lemma:jumping> <lemma:ceiling> ride christmas jean leaf glass runs"
    )
    assert seen == ["jumping", "ceiling"]


@pytest.fixture()
def empty_nltk_path(monkeypatch):
    """NLTK searches only the folders the test gives it (monkeypatch restores the real search path)."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setattr(metrics, "_nltk_ready_for", None)


def test_okvqa_missing_nltk_data_names_resources_and_command(tmp_path, empty_nltk_path, monkeypatch):
    data_dir = tmp_path / "nltk_data"
    with pytest.raises(MissingNLTKResourceError) as err:
        okvqa_stem("dogs running", nltk_data_dir=data_dir)
    assert isinstance(err.value, LookupError)
    assert err.value.missing == ["punkt_tab", "averaged_perceptron_tagger_eng", "wordnet"]
    assert f"python -m nltk.downloader -d {data_dir} punkt_tab averaged_perceptron_tagger_eng wordnet" in str(
        err.value
    )

    # With the tokenizer and tagger folders present, only wordnet is named; NLTK_DATA is honoured when set after
    # NLTK was imported.
    (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english").mkdir(parents=True)
    (tmp_path / "nltk_data" / "taggers" / "averaged_perceptron_tagger_eng").mkdir(parents=True)
    monkeypatch.setenv("NLTK_DATA", str(data_dir))
    with pytest.raises(MissingNLTKResourceError) as err:
        okvqa_postprocess("dogs running Question: why")
    assert err.value.missing == ["wordnet"]
    assert f"python -m nltk.downloader -d {data_dir} wordnet" in str(err.value)


def test_okvqa_postprocess_cuts_before_stemming(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "okvqa_stem", lambda text, nltk_data_dir=None: calls.append(text) or text)
    okvqa_postprocess("snowboarding Answer: skiing Question: what")
    assert calls == ["snowboarding "]


def _reference_okvqa_cut(prediction: str) -> str:
    """open_flamingo/eval/ok_vqa_utils.py postprocess_ok_vqa_generation, lines 212-213, verbatim (the stemming of
    line 214 is what okvqa_stem does, tested on its own)."""
    prediction = re.split("Question|Answer|Short", prediction, 1)[0]  # noqa: B034 - verbatim
    prediction = re.split(", ", prediction, 1)[0]  # noqa: B034 - verbatim
    return prediction


@pytest.mark.parametrize("generation", [
    "dogs, cats", "dogs, cats Question: what", "red,blue", "a, b, c", "Short answer: x", "dogs ,cats",
    "skiing Answer: no, yes", ", leading", "no comma here",
])
def test_okvqa_postprocess_cuts_at_comma_space_as_openflamingo(monkeypatch, generation):
    """The text OpenFlamingo stems is the text mmict stems: "dogs, cats" becomes "dogs" (then "dog"), scored 1
    against "dog" instead of 0 as "dog cat"."""
    calls = []
    monkeypatch.setattr(metrics, "okvqa_stem", lambda text, nltk_data_dir=None: calls.append(text) or text)
    okvqa_postprocess(generation)
    assert calls == [_reference_okvqa_cut(generation)]
    if generation == "dogs, cats":
        assert calls == ["dogs"]


def fake_nltk_data(root) -> str:
    """Empty folders where NLTK looks for the three resources: enough for the presence check, no real data."""
    for resource in metrics._NLTK_RESOURCES.values():
        (root / resource).mkdir(parents=True, exist_ok=True)
    return str(root)


def test_okvqa_stem_wires_tokenizer_tagger_and_verb_lemmatizer(tmp_path, empty_nltk_path, monkeypatch):
    """okvqa_stem as OpenFlamingo's OKVQAStemmer.stem: word_tokenize, then pos_tag on its tokens, then per word the
    manual table, else WordNet's *verb* lemma for "-ing" words (whatever their tag), else singularize plural nouns
    (NNS/NNPS). NLTK's tokenizer, tagger and lemmatizer are replaced by stand-ins that give what they would."""
    import nltk
    from nltk.corpus.reader import VERB

    tags = {"dogs": "NNS", "are": "VBP", "skiing": "VBG", "on": "IN", "mountains": "NNS", "Americans": "NNPS",
            "buildings": "NNS", "ceiling": "NN", "runs": "VBZ", "glass": "NN"}
    verb_lemmas = {"skiing": "ski"}  # WordNet returns a word it has no verb lemma for unchanged ("ceiling")
    calls: dict[str, list] = {"tokenize": [], "tag": [], "lemmatize": []}

    class StandInLemmatizer:
        def lemmatize(self, word: str, pos: str = "n") -> str:
            calls["lemmatize"].append((word, pos))
            return verb_lemmas.get(word, word) if pos == VERB else word

    def tokenize(text: str) -> list[str]:
        calls["tokenize"].append(text)
        return text.split()

    def pos_tag(tokens: list[str]) -> list[tuple[str, str]]:
        calls["tag"].append(list(tokens))
        return [(t, tags[t]) for t in tokens]

    monkeypatch.setattr(nltk.tokenize, "word_tokenize", tokenize)
    monkeypatch.setattr(nltk, "pos_tag", pos_tag)
    monkeypatch.setattr(nltk.stem, "WordNetLemmatizer", StandInLemmatizer)
    data = fake_nltk_data(tmp_path / "nltk_data")

    assert okvqa_stem("dogs are skiing", nltk_data_dir=data) == "dog are ski"
    assert calls["tokenize"] == ["dogs are skiing"] and calls["tag"] == [["dogs", "are", "skiing"]]
    assert calls["lemmatize"] == [("skiing", VERB)]  # only the "-ing" word, as a verb
    # manual table first ("buildings" -> "build", never singularized to "building"), NNPS singularized too,
    # "-ing" nouns still go to the verb lemmatizer, other tags are kept
    assert okvqa_stem("Americans on mountains buildings ceiling runs glass", nltk_data_dir=data) == \
        "American on mountain build ceiling runs glass"
    assert calls["lemmatize"][-1] == ("ceiling", VERB)

    # What the eval loop calls for OK-VQA: cut at "Question", stem, then VQA accuracy against the (stemmed)
    # OK-VQA v1.1 answers. Unstemmed, "dogs" would match none of them.
    from mmict.eval.tasks import get_task

    okvqa = get_task("okvqa")
    monkeypatch.setenv("NLTK_DATA", data)
    answer = okvqa.postprocess("dogs Question: what")
    assert answer == "dog" and okvqa.score(answer, ["dog"] * 10) == 1.0
    assert okvqa.score("dogs", ["dog"] * 10) == 0.0


def test_okvqa_task_without_nltk_data_fails_with_the_install_command(tmp_path, empty_nltk_path, monkeypatch):
    from mmict.eval.tasks import get_task

    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "empty"))
    with pytest.raises(MissingNLTKResourceError) as err:
        get_task("okvqa").postprocess("dogs")
    assert err.value.missing == ["punkt_tab", "averaged_perceptron_tagger_eng", "wordnet"]
    assert f"python -m nltk.downloader -d {tmp_path / 'empty'} punkt_tab" in str(err.value)


def _nltk_data_present() -> bool:
    try:
        metrics._prepare_nltk(None)
    except LookupError:
        return False
    return True


@pytest.mark.skipif(not _nltk_data_present(), reason="NLTK data not installed (CI has none; nothing is downloaded)")
def test_okvqa_stem_with_nltk_data():
    assert okvqa_stem("dogs are running") == "dog are run"


# ------------------------------------------------------------------------------------------------------ captions


@needs_java
def test_cider_by_hand_and_corpus_document_frequency():
    # One-word captions: only unigrams, so 3 of CIDEr-D's 4 n-gram terms are 0. With 2 images, idf = log(2) - log(df).
    # "dog" vs "dog" in a corpus where "dog" is in 1 of 2 reference sets: cosine 1 -> mean([1,0,0,0]) * 10 = 2.5.
    score, per_image = cider({"1": "dog", "2": "cat"}, {"1": ["dog"], "2": ["cat"]})
    assert per_image == pytest.approx({"1": 2.5, "2": 2.5})
    assert score == pytest.approx(2.5)
    # The same image 1 (same caption, same reference) when image 2's reference is also "dog": df = 2, idf = 0,
    # so the perfect caption now scores 0. The score depends on the rest of the corpus.
    _, per_image = cider({"1": "dog", "2": "cat"}, {"1": ["dog"], "2": ["dog"]})
    assert per_image["1"] == 0.0
    # Length penalty: "dog" vs "dog runs". Unigram tf-idf vectors (log2) and (log2, log2): cosine 1/sqrt(2); the
    # reference is one token longer, delta = -1, Gaussian penalty exp(-1/(2*6^2)). PTB drops the period of "Dog.".
    _, per_image = cider({"1": "Dog.", "2": "cat"}, {"1": ["dog runs"], "2": ["cat"]})
    assert per_image["1"] == pytest.approx(2.5 * math.exp(-1 / 72) / math.sqrt(2))


@needs_java
def test_cider_all_references_identical_scores_zero():
    # Every n-gram of the references occurs in every image's references: idf = log(N) - log(N) = 0 for all of them,
    # so even word-perfect captions score 0 (CIDEr rewards what is specific to an image).
    refs = {str(i): ["a dog on the grass"] for i in range(4)}
    score, per_image = cider({k: "A dog on the grass." for k in refs}, refs)
    assert score == 0.0 and set(per_image.values()) == {0.0}


def test_cider_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="same ids"):
        cider({"1": "dog"}, {"2": ["dog"]}, tokenizer="simple")


# Image 1: word-perfect. Image 2: "a red car" vs "a big red boat".
_CORPUS_PRED = {"1": "A dog runs on the grass.", "2": "A red car."}
_CORPUS_REFS = {"1": ["A dog runs on the grass.", "a dog is running"], "2": ["a big red boat"]}


@pytest.fixture(scope="module")
def corpus_metrics():
    return caption_metrics(_CORPUS_PRED, _CORPUS_REFS, tokenizer="ptb")


@needs_java
def test_caption_metrics_bleu_rouge_by_hand(corpus_metrics):
    m = corpus_metrics
    assert set(m) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    # Corpus BLEU ("closest" reference length): hypothesis lengths 6 + 3 = 9, closest reference lengths 6 + 4 = 10,
    # brevity penalty exp(1 - 10/9). Clipped n-gram precisions over the corpus: 1-grams (6+2)/9 ("a", "red"),
    # 2-grams (5+0)/7, 3-grams (4+0)/5, 4-grams 3/3.
    bp = math.exp(1 - 10 / 9)
    assert m["BLEU-1"] == pytest.approx(bp * 8 / 9, rel=1e-6)
    assert m["BLEU-4"] == pytest.approx(bp * (8 / 9 * 5 / 7 * 4 / 5 * 1) ** 0.25, rel=1e-6)
    # ROUGE-L (beta 1.2), averaged over images: image 1 = 1; image 2: LCS "a red" = 2, P = 2/3, R = 2/4.
    p, r, b2 = 2 / 3, 2 / 4, 1.2**2
    assert m["ROUGE-L"] == pytest.approx((1 + (1 + b2) * p * r / (r + b2 * p)) / 2)
    assert m["CIDEr"] == pytest.approx(cider(_CORPUS_PRED, _CORPUS_REFS)[0])


@needs_java
def test_caption_metrics_meteor(corpus_metrics):
    # METEOR's scoring (stemming, synonyms, paraphrases, fragmentation penalty) is not redone by hand: 0.40485 is
    # what meteor-1.5.jar (pycocoevalcap 1.2) reports for this corpus when called directly (per image 1.0 and 0.1675;
    # the corpus score comes from the pooled statistics, not their mean). Guards the wiring: tokenised input, the
    # corpus score rather than a per-image one, the JVM started and read back.
    assert corpus_metrics["METEOR"] == pytest.approx(0.40485, abs=1e-4)


@needs_java
def test_simple_tokenizer_matches_ptb_on_common_captions():
    caps = {
        "1": "A man's dog (a terrier) runs, doesn't it?",
        "2": 'Two "happy" kids -- playing on a black-and-white floor; 3.5 meters!',
        "3": "The cat sat on the mat.   ",
        "4": "A woman's red-colored umbrella: it's big...",
        "5": "People can't wait at the bus stop.",
    }
    refs = {k: [v] for k, v in caps.items()}
    assert metrics._tokenize_captions(caps, refs, "simple") == metrics._tokenize_captions(caps, refs, "ptb")


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_captions():
    # The PTB tokenizer reads one caption per line: a "\r" or U+2028 inside a caption used to split it in two and
    # give every later image the previous image's caption.
    preds = {"1": "a dog\rruns", "2": "a cat\u2028sits", "3": "last one"}
    gts, res = metrics._tokenize_captions(preds, {k: [f"ref {k}"] for k in preds}, "ptb")
    assert res == {"1": ["a dog runs"], "2": ["a cat sits"], "3": ["last one"]}
    assert gts == {k: [f"ref {k}"] for k in preds}


def test_without_java_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(metrics, "_java_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="Java not found"):
        m = caption_metrics(_CORPUS_PRED, _CORPUS_REFS)
    assert math.isnan(m["METEOR"])
    # The fallback tokenises this corpus as PTB does, so the other numbers are the hand-computed ones.
    assert m["BLEU-1"] == pytest.approx(math.exp(1 - 10 / 9) * 8 / 9, rel=1e-6)
    with pytest.raises(RuntimeError, match="needs Java"):
        cider(_CORPUS_PRED, _CORPUS_REFS, tokenizer="ptb")


# ------------------------------------------------------------------------------------------------ Hateful Memes


def test_p_yes_is_softmax_of_length_normalised_loglikelihoods():
    # yes: -1.0 over 1 token -> -1; no: -4.0 over 2 tokens -> -2; softmax -> 1 / (1 + e^-1). Without the length
    # normalisation it would be 1 / (1 + e^-3) = 0.953.
    (p,) = p_yes_from_loglikelihoods([-1.0], 1, [-4.0], 2)
    assert p == pytest.approx(1 / (1 + math.exp(-1)))
    # Per-example token counts, and extreme scores without overflow.
    ps = p_yes_from_loglikelihoods([-6.0, -1000.0, 0.0], [3, 1, 1], [-2.0, 0.0, -1000.0], [1, 1, 1])
    assert ps[0] == pytest.approx(0.5)
    assert ps[1] == pytest.approx(0.0, abs=1e-300) and ps[2] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        p_yes_from_loglikelihoods([-1.0], 0, [-1.0], 1)


def test_hateful_memes_auc_with_ties():
    assert hateful_memes_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's docstring case
    # Positives 0.5, 0.9; negatives 0.2, 0.5. Pairs: 0.5>0.2 (1), 0.5=0.5 (1/2), 0.9 beats both (2) -> 3.5 / 4.
    assert hateful_memes_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert hateful_memes_auc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)  # all tied: one diagonal step
    assert hateful_memes_auc([0.9, 0.1], [0, 1]) == 0.0
    with pytest.raises(ValueError, match="one class"):
        hateful_memes_auc([0.1, 0.2], [1, 1])
