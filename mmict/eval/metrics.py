"""Answer and caption scoring: the field's reference metrics, reproduced exactly.

- VQA v2 / VizWiz / OK-VQA / TextVQA accuracy: the official VQA evaluation (``vqaEval.py`` of the VQA API)
  normalisation and its leave-one-out min(1, #matches / 3) accuracy.
- OK-VQA: the v1.1 stemming of the prediction that OpenFlamingo applies (NLTK tokenizer, POS tagger and WordNet
  lemmatizer, ``inflection.singularize``, a table of manual matches), before the VQA accuracy.
- Captions: pycocoevalcap's CIDEr-D, BLEU, METEOR, ROUGE-L on PTB-tokenised text.
- Hateful Memes: ROC-AUC of P(yes) from length-normalised log-likelihoods.

``normalize_answer`` and ``exact_match``: the toy tasks' light metric. Heavy dependencies (nltk, pycocoevalcap, a JVM)
load only when their metric is called, so importing this module stays cheap."""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = {"a", "an", "the"}
def normalize_answer(text: str) -> str:
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy: the tables below are copied verbatim from the official VQA API's vqaEval.py (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py, the Python 3 version; OpenFlamingo's vqa_metric.py holds the same).
# Their quirks are kept on purpose, since published numbers were computed with them: the capitalised keys ("Im",
# "Ive", "Id've") can never match because the text is lower-cased first, and "somebody'd" maps to "somebodyd".
# ---------------------------------------------------------------------------------------------------------------

_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = ["a", "an", "the"]
# The official pattern, verbatim. "(?!<=\d)" is a typo for a look-behind: as written it is a look-ahead that can
# never fail in front of a ".", so in effect a period is removed unless a digit follows ("3.5" keeps it).
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_VQA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _vqa_process_punctuation(in_text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any mark at all, once the text holds a digit-comma-digit
    such as "1,000") is deleted; otherwise it becomes a space ("a-b" -> "a b"). The conditions look at the input
    text, not at the text being rewritten, as the original does."""
    out_text = in_text
    for p in _VQA_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_VQA_COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # The original passes re.UNICODE positionally, where sub() takes `count`: at most 32 periods are removed.
    return _VQA_PERIOD_STRIP.sub("", out_text, count=int(re.UNICODE))


def _vqa_process_digit_article(in_text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, restore contractions."""
    out_text = []
    for word in in_text.lower().split():
        word = _VQA_MANUAL_MAP.get(word, word)
        if word not in _VQA_ARTICLES:
            out_text.append(word)
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in out_text)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA normalisation: newline/tab -> space, strip, punctuation, then digits/articles/contractions.

    We apply it to the prediction and to every human answer, always, as OpenFlamingo, lmms-eval and VLMEvalKit do.
    (The official script normalises the human answers only when they are not all identical, and then with the
    punctuation step alone; on real annotations this changes almost nothing, and the harnesses we compare with
    normalise everything.)
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy in [0, 1]: for each human answer, drop it and score min(1, #matches / 3) against the
    others; return the average over these leave-one-out subsets. Works for any number of answers (VQA v2, VizWiz and
    OK-VQA have 10; OK-VQA lists each of its 5 answers twice).

    An answer is dropped **by position**, as the official code does (its answers carry unique ``answer_id``s, so its
    ``item != gtAnsDatum`` removes exactly one). OpenFlamingo compares answer dicts that, for VizWiz and TextVQA,
    lack ids, so removing one answer removes every equal answer with it: a prediction that matches 2 of 10 answers
    scores 0.533 there instead of 0.6, which under-scores VizWiz. The `openflamingo` evaluation protocol reproduces
    that (`vqa_accuracy_openflamingo`); this is the official rule.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    total = sum(matches)
    # Dropping answer i leaves total - matches[i] matching answers among the others.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(answers)


def vqa_accuracy_openflamingo(prediction: str, answers: list[str]) -> float:
    """VQA accuracy as OpenFlamingo's vqa_metric.py computes it on answer files without answer ids (its VizWiz and
    TextVQA files): `otherGTAns = [item for item in answers if item != gtAnsDatum]` (lines 421-423) compares answer
    dicts that differ only by their text, so leaving one answer out leaves out every equal answer with it. A prediction
    matching 2 of 10 answers scores 8/10 * 2/3 = 0.533 instead of 0.6. The `openflamingo` protocol scores VizWiz and
    TextVQA this way, to stand next to OpenFlamingo's numbers; `vqa_accuracy` is the official rule."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    norm = [normalize_vqa_answer(a) for a in answers]
    return sum(min(1.0, sum(o == pred for o in norm if o != a) / 3.0) for a in norm) / len(norm)


# ---------------------------------------------------------------------------------------------------------------
# OK-VQA stemming (OK-VQA v1.1's procedure as OpenFlamingo's open_flamingo/eval/ok_vqa_utils.py implements it).
# The answers of OK-VQA v1.1 are already stemmed; only the prediction goes through this, then vqa_accuracy.
# ---------------------------------------------------------------------------------------------------------------

# Words the automatic rules below miss or get wrong, found by the OK-VQA authors by comparing the released
# raw_answers and answers fields (copied verbatim from ok_vqa_utils.py).
_OKVQA_MANUAL_MATCHES = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride", "leaves": "leaf",
    "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove", "tennis": "tennis",
    "dining": "dine", "directions": "direct", "waves": "wave", "christmas": "christmas", "drives": "drive",
    "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta", "hornes": "horn", "graves": "grave",
    "mating": "mate", "paned": "pane", "alertness": "alert", "sunbathing": "sunbath", "tenning": "ten",
    "wetness": "wet", "urinating": "urine", "sickness": "sick", "braves": "brave", "firefighting": "firefight",
    "lenses": "lens", "reflections": "reflect", "backpackers": "backpack", "eatting": "eat", "designers": "design",
    "curiousity": "curious", "playfulness": "play", "blindness": "blind", "hawke": "hawk", "tomatoe": "tomato",
    "rodeoing": "rodeo", "brightness": "bright", "circuses": "circus", "skateboarders": "skateboard",
    "staring": "stare", "electronics": "electron", "electicity": "elect", "mountainous": "mountain",
    "socializing": "social", "hamburgers": "hamburg", "caves": "cave", "transitions": "transit", "wading": "wade",
    "creame": "cream", "toileting": "toilet", "sautee": "saute", "buildings": "build", "belongings": "belong",
    "stockings": "stock", "walle": "wall", "cumulis": "cumuli", "travelers": "travel", "conducter": "conduct",
    "browsing": "brows", "pooping": "poop", "haircutting": "haircut", "toppings": "top", "hearding": "heard",
    "sunblocker": "sunblock", "bases": "base", "markings": "mark", "mopeds": "mope", "kindergartener": "kindergarten",
    "pies": "pie", "scrapbooking": "scrapbook", "couponing": "coupon", "meetings": "meet", "elevators": "elev",
    "lowes": "low", "men's": "men", "childrens": "children", "shelves": "shelve", "paintings": "paint",
    "raines": "rain", "paring": "pare", "expressions": "express", "routes": "rout", "pease": "peas",
    "vastness": "vast", "awning": "awn", "boy's": "boy", "drunkenness": "drunken", "teasing": "teas",
    "conferences": "confer", "ripeness": "ripe", "suspenders": "suspend", "earnings": "earn", "reporters": "report",
    "kid's": "kid", "containers": "contain", "corgie": "corgi", "porche": "porch", "microwaves": "microwave",
    "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen", "striping": "stripe",
    "purring": "pure", "professionals": "profession", "piping": "pipe", "farmer's": "farmer", "potatoe": "potato",
    "emirates": "emir", "womens": "women", "veteran's": "veteran", "wilderness": "wilder", "propellers": "propel",
    "alpes": "alp", "charioteering": "chariot", "swining": "swine", "illness": "ill", "crepte": "crept",
    "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi", "overseas": "oversea",
    "travellers": "travel", "casings": "case", "smugness": "smug", "doves": "dove", "nationals": "nation",
    "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier", "vacationing": "vacate", "reminders": "remind",
    "baldness": "bald", "settings": "set", "glaced": "glace", "coniferous": "conifer", "revelations": "revel",
    "personals": "person", "daughter's": "daughter", "badness": "bad", "projections": "project",
    "polarizing": "polar", "vandalizers": "vandal", "minerals": "miner", "protesters": "protest",
    "controllers": "control", "weddings": "wed", "sometimes": "sometime", "earing": "ear",
}  # fmt: skip

# The NLTK resources the stemmer loads, by the names NLTK >= 3.9 uses (word_tokenize -> punkt_tab, pos_tag ->
# averaged_perceptron_tagger_eng; OpenFlamingo ran on the older pickled "punkt" / "averaged_perceptron_tagger", the
# same models in another file format) and the path nltk.data.find looks each one up by.
_NLTK_RESOURCES = {
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
    "wordnet": "corpora/wordnet",
}
_OKVQA_SPLIT = re.compile("Question|Answer|Short")
_nltk_ready_for: tuple[str, ...] | None = None  # nltk.data.path when all resources were last found


class MissingNLTKResourceError(LookupError):
    """An NLTK resource the OK-VQA stemmer needs is not installed locally (nothing is downloaded at run time)."""

    def __init__(self, missing: list[str], searched: list[str], target_dir: str):
        self.missing = missing
        self.searched = searched
        self.target_dir = target_dir
        names = " ".join(missing)
        super().__init__(
            f"OK-VQA stemming needs the NLTK resource(s) {', '.join(repr(m) for m in missing)}, not found in "
            f"{searched}. Install them once where the network is reachable (then copy the folder to offline "
            f"machines):\n    python -m nltk.downloader -d {target_dir} {names}\n"
            f"and point NLTK_DATA={target_dir} (or nltk_data_dir=) at that folder."
        )


def _prepare_nltk(nltk_data_dir: str | os.PathLike[str] | None) -> None:
    """Put the configured data folders first on NLTK's search path and check every resource is there, so a missing
    one fails on the first prediction with an install command rather than deep inside NLTK."""
    import nltk

    global _nltk_ready_for
    # NLTK reads NLTK_DATA only when it is imported; read it again so a value set later is honoured too.
    dirs = [str(nltk_data_dir)] if nltk_data_dir is not None else []
    dirs += [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    for d in reversed(dirs):
        if d not in nltk.data.path:
            # word_tokenize, pos_tag and WordNet look only at the global search path, so it is the one to extend.
            nltk.data.path.insert(0, d)
    if _nltk_ready_for == tuple(nltk.data.path):
        return
    missing = []
    for name, resource in _NLTK_RESOURCES.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(name)
    if missing:
        target = dirs[0] if dirs else str(Path.home() / "nltk_data")
        raise MissingNLTKResourceError(missing, list(nltk.data.path), target)
    _nltk_ready_for = tuple(nltk.data.path)


def check_nltk_data(nltk_data_dir: str | os.PathLike[str] | None = None) -> None:
    """`MissingNLTKResourceError` (with the download command) unless OK-VQA stemming's NLTK data is found."""
    _prepare_nltk(nltk_data_dir)


def _okvqa_stem_tagged(word_and_pos: Iterable[tuple[str, str]], lemmatize_verb: Callable[[str], str]) -> str:
    """OKVQAStemmer.stem after tokenising and tagging: manual matches first, then "-ing" words -> WordNet verb
    lemma, then plural nouns (NNS/NNPS) -> inflection.singularize; every other word is kept as is."""
    import inflection

    stemmed = []
    for w, p in word_and_pos:
        if w in _OKVQA_MANUAL_MATCHES:
            w = _OKVQA_MANUAL_MATCHES[w]
        elif w.endswith("ing"):
            w = lemmatize_verb(w)
        elif p.startswith("NNS") or p.startswith("NNPS"):
            w = inflection.singularize(w)
        stemmed.append(w)
    return " ".join(stemmed)


def okvqa_stem(text: str, nltk_data_dir: str | os.PathLike[str] | None = None) -> str:
    """OK-VQA v1.1 stemming of a prediction (OpenFlamingo's OKVQAStemmer): NLTK word_tokenize + pos_tag, WordNet
    verb lemmas for "-ing" words, singular plural nouns, a manual table.

    NLTK data (punkt_tab, averaged_perceptron_tagger_eng, wordnet) is read from ``nltk_data_dir``, then ``$NLTK_DATA``,
    then NLTK's default folders; nothing is downloaded. Raises MissingNLTKResourceError, naming the missing resources
    and the command that installs them, when one is absent.
    """
    import nltk
    from nltk.corpus.reader import VERB

    _prepare_nltk(nltk_data_dir)
    lemmatizer = nltk.stem.WordNetLemmatizer()
    tagged = nltk.pos_tag(nltk.tokenize.word_tokenize(text))
    return _okvqa_stem_tagged(tagged, lambda w: lemmatizer.lemmatize(w, VERB))


def okvqa_postprocess(prediction: str, nltk_data_dir: str | os.PathLike[str] | None = None) -> str:
    """OpenFlamingo's postprocess_ok_vqa_generation (open_flamingo/eval/ok_vqa_utils.py, lines 211-215): cut at
    the first "Question"/"Answer"/"Short", then at the first ", " (so "dogs, cats" is scored as "dog"), then stem."""
    prediction = _OKVQA_SPLIT.split(prediction, maxsplit=1)[0]
    prediction = prediction.split(", ", 1)[0]  # ok_vqa_utils.py line 213: re.split(", ", prediction, 1)[0]
    return okvqa_stem(prediction, nltk_data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Captions (pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------------

Tokenizer = Literal["auto", "ptb", "simple"]
# pycocoevalcap's PTBTokenizer drops these tokens after tokenising (its PUNCTUATIONS list).
_PTB_DROPPED = {
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
}  # fmt: skip
# Every character str.splitlines() breaks at. pycocoevalcap replaces only "\n" before writing one caption per line,
# but the PTBTokenizer also breaks lines at "\r", U+2028, ..., which shifts every later caption onto the wrong
# image without an error. We turn them all into spaces; captions without them tokenise exactly as before.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def _java_available() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(caption: str) -> str:
    """Java-free stand-in for the Stanford PTBTokenizer call: NLTK's Treebank word tokenizer (a regex port of the
    same PTB conventions, no data needed), lower-cased, then pycocoevalcap's punctuation list removed. Like the
    reference, brackets survive as "-lrb-"/"-rrb-" (it lower-cases before comparing with "-LRB-"). It differs from
    Stanford's on rarer cases (abbreviations such as "U.S.", some hyphenations), so scores are close, not equal."""
    from nltk.tokenize import TreebankWordTokenizer

    tokens = TreebankWordTokenizer().tokenize(_LINE_BREAKS.sub(" ", caption).lower(), convert_parentheses=True)
    # Lower-case before filtering, as the reference does (java -lowerCase), so "-lrb-" is not in the list and stays.
    return " ".join(t.lower() for t in tokens if t.lower() not in _PTB_DROPPED)


def _resolve_tokenizer(tokenizer: Tokenizer) -> Literal["ptb", "simple"]:
    if tokenizer == "simple":
        return "simple"
    if _java_available():
        return "ptb"
    if tokenizer == "ptb":
        raise RuntimeError("PTB tokenization needs Java (`java` on PATH); install a JRE or pass tokenizer='simple'")
    warnings.warn(
        "Java not found: captions are tokenised with the Treebank fallback instead of Stanford's PTBTokenizer "
        "(scores are close to, not equal to, published ones) and METEOR is not computed",
        RuntimeWarning,
        stacklevel=3,
    )
    return "simple"


def _tokenize_captions(
    predictions: dict[str, str], references: dict[str, list[str]], tokenizer: Literal["ptb", "simple"]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """-> (references, predictions) tokenised as pycocoevalcap's COCOEvalCap does, in pycocoevalcap's gts/res form."""
    if set(predictions) != set(references):
        only_pred = sorted(set(predictions) - set(references))[:5]
        only_ref = sorted(set(references) - set(predictions))[:5]
        raise ValueError(f"predictions and references must have the same ids (only in predictions: {only_pred}, "
                         f"only in references: {only_ref})")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"every image needs at least one reference caption (none for {empty[:5]})")
    if tokenizer == "simple":
        gts = {k: [_simple_tokenize(r) for r in refs] for k, refs in references.items()}
        res = {k: [_simple_tokenize(predictions[k])] for k in references}
        return gts, res
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One JVM start for both sides (COCOEvalCap tokenises them in two calls): the keys only need to stay apart.
    merged = {("ref", k): [{"caption": _LINE_BREAKS.sub(" ", r)} for r in refs] for k, refs in references.items()}
    merged.update({("pred", k): [{"caption": _LINE_BREAKS.sub(" ", predictions[k])}] for k in references})
    tokenized = PTBTokenizer().tokenize(merged)
    gts = {k: tokenized[("ref", k)] for k in references}
    res = {k: tokenized[("pred", k)] for k in references}
    return gts, res


def _cider_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    from pycocoevalcap.cider.cider import Cider

    score, scores = Cider().compute_score(gts, res)
    return float(score), {k: float(s) for k, s in zip(gts, scores, strict=True)}


def cider(
    predictions: dict[str, str], references: dict[str, list[str]], tokenizer: Tokenizer = "auto"
) -> tuple[float, dict[str, float]]:
    """CIDEr-D as pycocoevalcap computes it (its ``Cider`` is CIDEr-D: clipped n-gram counts, Gaussian length
    penalty with sigma 6, x10), on PTB-tokenised, lower-cased captions without punctuation.

    Corpus-level: the IDF comes from the document frequencies of n-grams over the references of *all* images
    passed together, so score a whole split at once; the same caption scores differently in another corpus.
    ``tokenizer``: "ptb" (Stanford PTBTokenizer, needs Java), "simple" (Java-free approximation) or "auto" (PTB when
    Java is found, else "simple" with a warning). Returns (corpus score, score per image id).
    """
    gts, res = _tokenize_captions(predictions, references, _resolve_tokenizer(tokenizer))
    return _cider_scores(gts, res)


def caption_metrics(
    predictions: dict[str, str], references: dict[str, list[str]], tokenizer: Tokenizer = "auto"
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr as pycocoevalcap's COCOEvalCap computes them (corpus-level BLEU with the
    "closest" reference length, METEOR 1.5 via Java, ROUGE-L with beta 1.2, CIDEr-D), keys "BLEU-1".."BLEU-4",
    "METEOR", "ROUGE-L", "CIDEr".

    "SPICE" is added where pycocoevalcap's Stanford CoreNLP jars are installed (`spice_available`): its SPICE
    would otherwise download them at first use, which fails on an offline machine, so it is not run then. Without
    Java (tokenizer "auto"), the tokenisation falls back as in ``cider`` and METEOR is NaN.
    """
    mode = _resolve_tokenizer(tokenizer)
    gts, res = _tokenize_captions(predictions, references, mode)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    if _java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            del meteor  # its __del__ kills the JVM; CPython runs it here, not at some later collection
    else:
        out["METEOR"] = math.nan
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = _cider_scores(gts, res)[0]
    if spice_available():
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def spice_available() -> bool:
    """Java and the Stanford CoreNLP jars pycocoevalcap's SPICE needs (get_stanford_models.py fetches them from the
    internet when missing; they are looked for, never downloaded)."""
    if not _java_available():
        return False
    from importlib.util import find_spec

    spec = find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "spice" / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").is_file() and (lib / "stanford-corenlp-3.6.0-models.jar").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Hateful Memes
# ---------------------------------------------------------------------------------------------------------------


def p_yes_from_loglikelihoods(
    ll_yes: Sequence[float],
    n_yes_tokens: int | Sequence[int],
    ll_no: Sequence[float],
    n_no_tokens: int | Sequence[int],
) -> list[float]:
    """P(yes) per example from the summed log-likelihoods of the "yes" and "no" continuations: each is divided by
    its token count (so a label that tokenises into more pieces is not penalised), then a softmax over the two.
    Token counts may be one int for all examples or one per example (tokenisation can depend on the context)."""
    n = len(ll_yes)
    if len(ll_no) != n:
        raise ValueError(f"ll_yes has {n} entries, ll_no {len(ll_no)}")
    n_yes = [n_yes_tokens] * n if isinstance(n_yes_tokens, int) else list(n_yes_tokens)
    n_no = [n_no_tokens] * n if isinstance(n_no_tokens, int) else list(n_no_tokens)
    if len(n_yes) != n or len(n_no) != n or min(n_yes + n_no, default=1) < 1:
        raise ValueError("token counts must be positive, one int or one per example")
    out = []
    for ly, ny, ln, nn in zip(ll_yes, n_yes, ll_no, n_no, strict=True):
        d = ly / ny - ln / nn
        # softmax([a, b])[0] = sigmoid(a - b), written so exp never overflows
        out.append(1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d)))
    return out


def hateful_memes_auc(p_yes: list[float], labels: list[int]) -> float:
    """ROC-AUC of the scores against 0/1 labels, equal to sklearn's roc_auc_score: the probability that a random
    positive scores above a random negative, ties counting one half (sklearn's ROC joins tied scores into one
    diagonal step, whose trapezoid gives exactly that half). Computed from average ranks (Mann-Whitney U)."""
    if len(p_yes) != len(labels):
        raise ValueError(f"{len(p_yes)} scores but {len(labels)} labels")
    if any(y not in (0, 1) for y in labels):
        raise ValueError("labels must be 0 or 1")
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC is undefined when only one class is present in the labels")
    if any(math.isnan(p) for p in p_yes):
        raise ValueError("scores contain NaN")
    order = sorted(range(len(p_yes)), key=lambda i: p_yes[i])
    ranks = [0.0] * len(p_yes)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and p_yes[order[j + 1]] == p_yes[order[i]]:
            j += 1
        for k in range(i, j + 1):  # tied scores share the average of their 1-based ranks
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum_pos = sum(r for r, y in zip(ranks, labels, strict=True) if y == 1)
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
