"""The single-concept rule checker: source and target text in, verdict out.

Appendix C of the SoftREPA paper asks Llama-3.1-8B-Instruct to rewrite a
caption so that exactly one concept changes (prompts/edit.txt, rules 1-7).
The paper trusted the model; its two published pairs both break the rules
as printed. :func:`check` verifies one rewrite. It is pure (stdlib only, no
model) and fast enough to run over every row of a store.

One module of ~600 lines on purpose: the steps below share the token and
region types and are read top to bottom as one algorithm; a third of the
length is word lists (data).

How a pair is judged
--------------------
1. The raw target is inspected for output-format faults: ``empty``,
   ``preamble`` ("Here is the modified text:"), ``trailing_commentary``
   ("Note: I replaced ..."), ``quoted`` (the whole output in quotes). Those
   wrappers are cut off before the content diff, so a good rewrite behind a
   preamble is reported as ``preamble`` only and its spans stay meaningful;
   ``truncated`` looks at the end of what remains.
2. Both texts are tokenised into words and punctuation (whitespace is never a
   token, so whitespace differences are not changes) and diffed with
   :class:`difflib.SequenceMatcher` on case-folded tokens.
3. Each changed region is a (source phrase, target phrase) pair. An a/an
   article that changes to agree with the new word is part of the replacement,
   not a change of its own; two regions joined by a single "of" are one phrase
   ("a cup of tea" -> "a glass of water").
4. Regions are classified: a pure insertion is ``added_content``, a pure
   deletion ``removed_content``, a punctuation change or a long rewritten run
   ``structure_changed``; the rest are replacements. Replacements whose
   content words share a lemma on both sides (dog / dogs / dog's -> fox /
   foxes / fox's) are the same concept at another mention; more than one
   distinct concept is ``multiple_concepts``, and so is one replaced phrase
   that swaps an adjective-noun phrase for a different one ("a small wooden
   chair" -> "a large metal table"; "a red car" -> "a red bus" is one).
   Colour words (with shades) that differ inside any region give
   ``color_change``; a building noun turned into another building noun gives
   ``building_type`` (rule 6).

A pair passes when no rule fires. Exactly one concept then changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from difflib import SequenceMatcher

RULES: dict[str, str] = {
    "empty": "the target (or the source) has no words",
    "identical": "the target is the source unchanged (ignoring whitespace and letter case)",
    "preamble": "the output starts with text that is not the caption, e.g. 'Here is the modified text:' (rule 5)",
    "trailing_commentary": "the output ends with commentary, e.g. 'Note: I replaced ...' (rule 5)",
    "quoted": "the whole output is wrapped in quotes or a code fence (rule 5)",
    "truncated": "the output stops mid-sentence",
    "color_change": "a colour word was changed, added or removed (rules 6, 7)",
    "building_type": "a building was turned into another type of building (rule 6)",
    "added_content": "words were added that replace nothing (rule 4: no new elements)",
    "removed_content": "words were removed without a replacement (rule 4)",
    "multiple_concepts": "more than one concept changed (rules 1, 7)",
    "structure_changed": "the sentence structure, word order or punctuation changed (rule 4)",
}


@dataclass(frozen=True)
class Verdict:
    """The checker's answer for one (source, target) pair.

    ``violations`` are rule ids in :data:`RULES` order. ``source_span`` /
    ``target_span`` are the replaced phrase and its replacement as they first
    appear (e.g. "dog" / "fox"; an agreeing a/an is left out), or None when no
    concept was replaced. ``source_spans`` / ``target_spans`` are parallel:
    entry i is the [start, end) character range of changed region i in the raw
    source and the raw target; a pure insertion has an empty range in the
    source at the insertion point, and a pure deletion one in the target.
    """

    passed: bool
    violations: tuple[str, ...]
    source_span: str | None = None
    target_span: str | None = None
    source_spans: tuple[tuple[int, int], ...] = ()
    target_spans: tuple[tuple[int, int], ...] = ()

    def reasons(self) -> list[str]:
        """One line per violation: ``"<rule id>: <reason>"``."""
        return [f"{v}: {RULES[v]}" for v in self.violations]


# ---------------------------------------------------------------- word lists

# Unambiguous colour words, and words that are colours only in adjective
# position ("an orange cat" is a colour, "an orange on the table" a fruit).
COLORS = frozenset(
    """red blue green yellow black white gray grey brown purple pink beige turquoise teal maroon
    crimson scarlet magenta cyan indigo khaki burgundy golden silvery ochre auburn azure vermilion
    chartreuse fuchsia aqua lilac mauve taupe blond blonde brunette greyish grayish reddish bluish
    greenish yellowish brownish pinkish purplish whitish blackish orangish orangey multicolored
    multicoloured colorful colourful colorless colourless monochrome sepia tawny russet sienna umber cerulean cobalt
    ultramarine emerald""".split()
)
AMBIGUOUS_COLORS = frozenset(
    """orange gold silver rose cream ivory lime olive peach coral salmon amber jade ruby plum lavender
    mint chocolate copper bronze charcoal violet tan navy wine cherry lemon sand slate rust mustard
    honey caramel platinum pearl smoky""".split()
)
# Shade modifiers change a colour when they sit right before one: light/dark blue.
SHADES = frozenset("light dark pale bright deep pastel vivid muted dull faded neon rich soft".split())
COLOR_SUFFIXES = ("-colored", "-coloured", "-toned", "-tinted", "-hued")

BUILDINGS = frozenset(
    """building house church cathedral chapel lighthouse tower skyscraper cabin barn castle temple
    mosque synagogue palace mansion cottage hut shed warehouse factory apartment hotel motel school
    hospital stadium museum library villa bungalow pagoda shrine monastery abbey fort fortress
    windmill silo garage storehouse farmhouse townhouse condominium condo highrise high-rise tenement
    greenhouse pavilion chalet lodge manor inn tavern pub restaurant cafe bakery theater theatre
    cinema office skyscraper shack igloo tepee teepee yurt dome basilica minaret courthouse
    capitol bunker hangar observatory""".split()
)

# Words that carry no concept of their own: a region that changes only these
# is grammar (or, alone, a small concept such as on -> under).
FUNCTION_WORDS = frozenset(
    """himself herself itself hers a an the this that these those its their his her our your my some any each every no
    and or but nor so yet of in on at to for from by with without within into onto over under
    above below near behind beside between among through across along around about against
    up down off out as than then there here it they them he she we you i is are was were be been
    being has have had do does did can could will would may might shall should must also
    which who whom whose where when while""".split()
)
ARTICLES = frozenset({"a", "an"})
# Number agreement that follows a replaced noun ("the dog is" -> "the dogs are").
AGREEMENT = {
    frozenset(p)
    for p in [("is", "are"), ("was", "were"), ("has", "have"), ("its", "their"), ("it", "they"),
              ("it", "them"), ("this", "these"), ("that", "those"), ("does", "do"),
              # a man -> a woman (his -> her), a dog -> a boy (its -> his)
              ("he", "she"), ("him", "her"), ("his", "her"), ("his", "hers"), ("himself", "herself"),
              ("it", "he"), ("it", "she"), ("its", "his"), ("its", "her"), ("it", "him"), ("itself", "himself"),
              ("itself", "herself"), ("he", "they"), ("she", "they"), ("his", "their"), ("her", "their")]
}
# Caption verbs that follow a subject noun: "an orange lies" is a fruit.
SUBJECT_VERBS = frozenset(
    """is are was were sits sit lies lie stands stand rests rest hangs hang appears appear seems seem
    sitting lying standing resting hanging placed located positioned covered filled surrounded""".split()
)
DANGLING = FUNCTION_WORDS - {"it", "them", "there", "here", "up", "down", "off", "out", "too"}

IRREGULAR_PLURALS = {
    "children": "child", "men": "man", "women": "woman", "people": "person", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "leaves": "leaf",
    "wolves": "wolf", "knives": "knife", "shelves": "shelf", "loaves": "loaf", "calves": "calf",
    "halves": "half", "wives": "wife", "lives": "life", "thieves": "thief", "dice": "die",
    "cacti": "cactus", "fungi": "fungus", "buses": "bus", "gases": "gas", "tomatoes": "tomato",
    "potatoes": "potato", "heroes": "hero", "mangoes": "mango", "volcanoes": "volcano",
}

# ---------------------------------------------------------------- wrappers

_PREAMBLE = re.compile(
    r"""^\s*(?:
        (?:sure|certainly|okay|ok|of\ course|absolutely|got\ it)\b[^\n]*?(?:[:!.]|\n)  # "Sure! ..."
      | here(?:'s|’s|\ is|\ are)\b[^\n]*?:                                           # "Here is the modified text:"
      | (?:the\ )?(?:output|answer|result|response|target(?:\ prompt|\ text)?
          |(?:modified|rewritten|edited|new|updated)\ (?:text|description|caption|prompt|version)
          |(?:text\ )?description)\s*:                                                 # "Output:"
      | [^\n:]{0,80}:\s*\n                                                             # any short "...:" line
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_COMMENTARY = re.compile(
    r"""(?:^|(?<=[.!?"”'’)\]])\s+|\n)\s*[(\[*_]*\s*(?:
        notes?\b|explanation\b|changes?(?:\ made)?\s*:|modifications?\s*:|reasoning\b
      | i(?:'ve|’ve|\ have)?\ (?:replaced|changed|modified|swapped|substituted|kept|made|only)\b
      | (?:in\ )?this\ (?:modified|modification|version|rewrite|text|change|edit)\b
      | the\ (?:only\ )?(?:change|modification|replacement)s?\ (?:is|was|were|made)\b
      | (?:replaced|changed|modified)\ ["“'‘]
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’", "```": "```", "`": "`", "«": "»"}
_TERMINAL = ".!?…\"”'’)]»"

# ---------------------------------------------------------------- tokens

# A word keeps inner apostrophes and hyphens (dog's, close-up); every other
# non-space character is its own token. Whitespace is never a token.
_TOKEN = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]")
_WORD = re.compile(r"\w")


def _tokens(text: str, lo: int = 0, hi: int | None = None) -> tuple[list[str], list[tuple[int, int]]]:
    toks, offs = [], []
    for m in _TOKEN.finditer(text, lo, len(text) if hi is None else hi):
        toks.append(m.group().casefold().replace("’", "'"))
        offs.append(m.span())
    return toks, offs


@lru_cache(maxsize=65536)
def lemma(word: str) -> str:
    """Fold plural and possessive forms: dogs, dog's, dogs' -> dog; puppies -> puppy."""
    w = word.casefold().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.rstrip("'")
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[:-2].endswith(("ss", "x", "z", "ch", "sh")):
        return w[:-2]  # foxes, glasses, benches (but horses, vases: just -s)
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def _is_word(tok: str) -> bool:
    return tok[0].isalnum() or tok[0] == "_"


@lru_cache(maxsize=65536)
def _colour_word(tok: str) -> int:
    """2: always a colour; 1: a colour in adjective position (orange); 0: not one."""
    if not _is_word(tok):
        return 0
    parts = [lemma(p) for p in tok.split("-")]
    if any(p in COLORS for p in parts) or tok.endswith(COLOR_SUFFIXES) or tok in ("colored", "coloured"):
        return 2
    return 1 if any(p in AMBIGUOUS_COLORS for p in parts) else 0


def _is_colour(toks: list[str], i: int) -> bool:
    """Does token i name a colour here? Context decides ambiguous words and shades."""
    kind = _colour_word(toks[i])
    nxt = toks[i + 1] if i + 1 < len(toks) else ""
    if kind == 2:
        return True
    if kind == 1:
        # adjective position: followed by a content word ("orange cat"), or
        # by "and" + a colour ("orange and white")
        return bool(nxt) and _is_word(nxt) and nxt not in FUNCTION_WORDS and nxt not in SUBJECT_VERBS or (
            nxt == "and" and i + 2 < len(toks) and _colour_word(toks[i + 2]) == 2
        )
    # a shade right before a colour changes it: light blue -> dark blue
    return toks[i] in SHADES and bool(nxt) and _is_colour(toks, i + 1)


def _colours(toks: list[str], lo: int, hi: int) -> list[str]:
    return sorted(lemma(toks[i]) for i in range(lo, hi) if _is_colour(toks, i))


# ---------------------------------------------------------------- cleaning


def _strip_wrappers(source: str, target: str) -> tuple[int, int, set[str]]:
    """Find preamble, trailing commentary and wrapping quotes in the raw target.

    Returns (lo, hi, rules): the caption proper is ``target[lo:hi]``. A
    wrapper that the source itself also has is not a fault (a caption may
    legitimately start "Note ..." or be quoted).
    """
    found: set[str] = set()
    src_head = source.lstrip()[:120].casefold()
    lo, hi = 0, len(target)
    for _ in range(2):  # 'Output: "..."' needs a second look after the quotes
        m = _PREAMBLE.match(target, lo, hi)
        if m and m.end() < hi and not src_head.startswith(target[lo:m.end()].strip().casefold()):
            # a "preamble" that eats the whole first sentence of a normal
            # caption is not one: require something substantial to follow
            if len(_TOKEN.findall(target[m.end():hi])) >= 2:
                found.add("preamble")
                lo = m.end()
        while lo < hi and target[lo].isspace():
            lo += 1
        while hi > lo and target[hi - 1].isspace():
            hi -= 1
        src_folded = source.casefold()
        for m in _COMMENTARY.finditer(target, lo, hi):
            if m.start() <= lo:
                continue
            # the marker ("Note", "I replaced", ...) must be new: a caption
            # may itself contain "note" or "this version"
            marker = re.sub(r"^[(\[*_\s]+", "", m.group()).strip().casefold()
            if not re.search(r"(?<!\w)" + re.escape(marker) + r"(?!\w)", src_folded):
                found.add("trailing_commentary")
                hi = m.start()
                break
        while hi > lo and target[hi - 1].isspace():
            hi -= 1
        s = source.strip()
        for open_q, close_q in _QUOTES.items():
            n = len(open_q)
            if (
                hi - lo > 2 * n
                and target.startswith(open_q, lo)
                and target[hi - n:hi] == close_q
                and not (s.startswith(open_q) and s.endswith(close_q))
            ):
                found.add("quoted")
                lo, hi = lo + n, hi - n
                if open_q == "```":  # ```text\n ... ```: drop the language tag
                    nl = target.find("\n", lo, hi)
                    if nl != -1 and " " not in target[lo:nl].strip():
                        lo = nl + 1
                while lo < hi and target[lo].isspace():
                    lo += 1
                while hi > lo and target[hi - 1].isspace():
                    hi -= 1
                break
    return lo, hi, found


def _truncated(source: str, body: str, src_toks: list[str], tgt_toks: list[str]) -> bool:
    s, t = source.rstrip(), body.rstrip()
    if not t or not tgt_toks:
        return False
    if t[-1] in _TERMINAL:
        return False
    if tgt_toks[-1] in (",", ";", ":", "-"):
        return True  # stopped right after a clause separator
    last = tgt_toks[-1]
    src_last = next((w for w in reversed(src_toks) if _is_word(w)), "")
    if last == src_last:
        return False  # the whole text is there; only the final stop is missing
    return s[-1:] in _TERMINAL or last in DANGLING


# ---------------------------------------------------------------- regions


@dataclass
class _Region:
    i1: int
    i2: int
    j1: int
    j2: int
    kind: str = ""  # concept | insert | delete | structure | agreement
    a1: int = 0  # token window after dropping an agreeing a/an
    b1: int = 0


def _regions(src: list[str], tgt: list[str]) -> list[_Region]:
    # The shared head and tail are most of a caption: diff only the middle
    # (SequenceMatcher's cost grows with the square of the length).
    head, n = 0, min(len(src), len(tgt))
    while head < n and src[head] == tgt[head]:
        head += 1
    tail = 0
    while tail < n - head and src[-1 - tail] == tgt[-1 - tail]:
        tail += 1
    a, b = src[head:len(src) - tail], tgt[head:len(tgt) - tail]
    ops = SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    regions = [_Region(i1 + head, i2 + head, j1 + head, j2 + head) for tag, i1, i2, j1, j2 in ops if tag != "equal"]
    merged: list[_Region] = []
    for r in regions:
        if merged:
            p = merged[-1]
            gap_src, gap_tgt = src[p.i2:r.i1], tgt[p.j2:r.j1]
            # "a cup of tea" -> "a glass of water": one phrase, not two changes
            joined_by_of = gap_src == ["of"] and gap_tgt == ["of"] and p.i2 > p.i1 and p.j2 > p.j1 and r.i2 > r.i1 and r.j2 > r.j1
            if joined_by_of:
                p.i2, p.j2 = r.i2, r.j2
                continue
        merged.append(r)
    return merged


def _classify(src: list[str], tgt: list[str], regions: list[_Region]) -> None:
    for r in regions:
        a, b = src[r.i1:r.i2], tgt[r.j1:r.j2]
        r.a1, r.b1 = r.i1, r.j1
        if a and b and a[0] in ARTICLES and b[0] in ARTICLES and a[0] != b[0]:
            r.a1, r.b1 = r.i1 + 1, r.j1 + 1  # a cat -> an owl: agreement, part of the replacement
            a, b = a[1:], b[1:]
        a_words = [t for t in a if _is_word(t)]
        b_words = [t for t in b if _is_word(t)]
        punct_changed = sorted(t for t in a if not _is_word(t)) != sorted(t for t in b if not _is_word(t))
        only_function = all(w in FUNCTION_WORDS for w in a_words + b_words)
        if not a_words and not b_words:
            r.kind = "structure" if punct_changed or a or b else "agreement"
        elif only_function and punct_changed and not (a_words and b_words):
            r.kind = "structure"  # ". It" -> ", and it": sentences joined or split
        elif not a_words:
            r.kind = "insert"
        elif not b_words:
            r.kind = "delete"
        elif punct_changed or max(len(a_words), len(b_words)) > 6:
            r.kind = "structure"  # a rewritten clause, not a replaced concept
        elif len(a_words) > 1 and sorted(a_words) == sorted(b_words):
            r.kind = "structure"  # same words, new order
        elif all(frozenset((x, y)) in AGREEMENT for x, y in zip(a_words, b_words)) and len(a_words) == len(b_words):
            r.kind = "agreement"
        else:
            r.kind = "concept"
    # Words deleted in one place and inserted in another were moved.
    dels = [r for r in regions if r.kind == "delete"]
    ins = [r for r in regions if r.kind == "insert"]
    deleted = set().union(*(_content(src[r.i1:r.i2]) for r in dels))
    inserted = set().union(*(_content(tgt[r.j1:r.j2]) for r in ins))
    for r in dels:
        if _content(src[r.i1:r.i2]) <= inserted:
            r.kind = "structure"
    for r in ins:
        if _content(tgt[r.j1:r.j2]) <= deleted:
            r.kind = "structure"
    # Two replacements that trade places ("a cat and a dog" -> "a dog and a cat").
    reps = [(r, _content(src[r.a1:r.i2]), _content(tgt[r.b1:r.j2])) for r in regions if r.kind == "concept"]
    for r, a, b in reps:
        for q, qa, qb in reps:
            if q is not r and a != b and a == qb and b == qa:
                r.kind = q.kind = "structure"


# Closed-class words: a change to one of them beside a replaced noun is a second
# concept ("a dog sits" -> "a cat stands", "two dogs" -> "three cats", "dog in"
# -> "fox of"); attribute words are judged by :func:`_attribute_swap`.
NUMBERS = frozenset("one two three four five six seven eight nine ten eleven twelve several many few couple dozen".split())


def _closed_class(x: str, y: str) -> bool:
    if x in SUBJECT_VERBS or y in SUBJECT_VERBS:
        return True
    if x in FUNCTION_WORDS and y in FUNCTION_WORDS:
        return True
    count = NUMBERS | ARTICLES  # "a dog" -> "two foxes": the count changed too
    return (x in count or x.isdigit()) and (y in count or y.isdigit())


def _fused_concepts(src: list[str], tgt: list[str], r: _Region) -> bool:
    """Does one replacement region change two things side by side?

    Word-aligned regions only (same word count on both sides): two or more
    changed positions, one of them a closed-class word (verb, preposition,
    determiner, number). Same-lemma and agreement pairs are not changes.
    """
    a = [t for t in src[r.a1:r.i2] if _is_word(t)]
    b = [t for t in tgt[r.b1:r.j2] if _is_word(t)]
    if len(a) != len(b) or len(a) < 2:
        return False
    changed = [(x, y) for x, y in zip(a, b) if lemma(x) != lemma(y) and frozenset((x, y)) not in AGREEMENT]
    return len(changed) >= 2 and any(_closed_class(x, y) for x, y in changed)


# Attribute adjectives: size, material, age, state, shape, texture, pattern.
# Rule 7 of prompts/edit.txt (appendix C) changes ONE concept: "a small wooden
# chair" -> "a large metal table" changes the object, its size and its material.
# Colours are not listed: a colour change is its own rule (color_change).
ATTRIBUTES = frozenset(
    """small large big little tiny huge giant enormous massive tall short long wide narrow thick thin
    miniature oversized compact petite high low deep shallow heavy light-weight lightweight
    wooden wood metal metallic steel iron plastic glass stone brick concrete leather wool woolen woollen
    cotton silk paper cardboard ceramic porcelain marble rubber wicker bamboo straw velvet denim fur furry
    clay granite tin copper-plated aluminum aluminium crystal fabric knitted woven
    old new modern ancient antique vintage young elderly broken open closed empty full wet dry clean
    dirty shiny rusty worn torn cracked fresh ripe rotten damaged new-looking weathered
    round square rectangular circular oval flat curved smooth rough hard fluffy fuzzy hairy spiky
    striped spotted checkered plaid patterned polka-dotted dotted wrinkled folded
    ornate plain fancy simple elegant rustic wild domestic stuffed toy""".split()
)
_ADJ_SUFFIXES = ("ous", "ful", "less", "able", "ible")


def _attribute(word: str) -> bool:
    w = lemma(word)
    return w in ATTRIBUTES or (len(w) > 5 and w.endswith(_ADJ_SUFFIXES))


def _attribute_swap(src: list[str], tgt: list[str], r: _Region) -> bool:
    """Does one replaced phrase change an attribute and something else with it?

    An adjective-noun phrase exchanged for a different adjective-noun phrase
    ("small wooden chair" -> "large metal table": object, size, material) or
    two attribute words changed at once ("small wooden" -> "large metal") is
    more than one concept. A phrase whose attribute stays ("a red car" ->
    "a red bus") never reaches here: the diff leaves the shared word out of
    the region. Colour words are ignored (``color_change`` covers them);
    "of" phrases ("cup of tea") are one compound noun.
    """
    a = [t for t in src[r.a1:r.i2] if _is_word(t)]
    b = [t for t in tgt[r.b1:r.j2] if _is_word(t)]
    if "of" in a or "of" in b or len(a) + len(b) < 3:
        return False

    def split(words: list[str]) -> tuple[set[str], set[str]]:
        mods: set[str] = set()
        words = [w for w in words if w not in ARTICLES and not _colour_word(w)]
        i = 0
        while i < len(words) - 1 and _attribute(words[i]):  # the last word is the head noun
            mods.add(lemma(words[i]))
            i += 1
        return mods, {lemma(w) for w in words[i:] if w not in FUNCTION_WORDS}

    (ma, ha), (mb, hb) = split(a), split(b)
    if ma and mb and ma != mb and ha and hb and ha != hb:
        return True  # the object and its attribute both changed
    only_attrs_a = [w for w in a if w not in ARTICLES and not _colour_word(w)]
    only_attrs_b = [w for w in b if w not in ARTICLES and not _colour_word(w)]
    if len(only_attrs_a) == len(only_attrs_b) >= 2 and all(map(_attribute, only_attrs_a + only_attrs_b)):
        return sum(lemma(x) != lemma(y) for x, y in zip(only_attrs_a, only_attrs_b)) >= 2
    return False


def _content(words: list[str]) -> frozenset[str]:
    lem = {lemma(w) for w in words if _is_word(w)}
    content = {w for w in lem if w not in FUNCTION_WORDS}
    return frozenset(content or lem)


def _concepts(src: list[str], tgt: list[str], regions: list[_Region]) -> list[list[_Region]]:
    """Group replacement regions into concepts (mentions of one replacement)."""
    groups: list[tuple[set[str], set[str], list[_Region]]] = []
    for r in regions:
        if r.kind != "concept":
            continue
        a, b = _content(src[r.a1:r.i2]), _content(tgt[r.b1:r.j2])
        for ga, gb, members in groups:
            if ga & a and gb & b:
                ga |= a
                gb |= b
                members.append(r)
                break
        else:
            groups.append((set(a), set(b), [r]))
    return [members for _, _, members in groups]


# ---------------------------------------------------------------- check


def check(source: str, target: str) -> Verdict:
    """Judge one rewrite against prompts/edit.txt's rules (see module doc).

    ``source`` is the caption, ``target`` the model's raw output. Never
    raises for any pair of strings; None is treated as empty.
    """
    source = source or ""
    target = target or ""
    src, src_off = _tokens(source)
    if not any(_is_word(t) for t in src) or not _WORD.search(target):
        return Verdict(False, ("empty",))
    lo, hi, found = _strip_wrappers(source, target)
    tgt, tgt_off = _tokens(target, lo, hi)
    if not any(_is_word(t) for t in tgt):
        return Verdict(False, tuple(r for r in RULES if r in found | {"empty"}))
    if _truncated(source, target[lo:hi], src, tgt):
        found.add("truncated")

    regions = _regions(src, tgt)
    _classify(src, tgt, regions)
    concepts = _concepts(src, tgt, regions)
    if not concepts:
        # with no replaced noun to agree with, "is -> are" is a change of its
        # own (a concept); a lone a -> an is a rewrite of the grammar
        for r in regions:
            if r.kind == "agreement":
                r.kind = "concept" if (r.i2 > r.a1 or r.j2 > r.b1) else "structure"
        concepts = _concepts(src, tgt, regions)

    if not regions:
        found.add("identical")
    # Token similarity (as SequenceMatcher.ratio()) not counting the mentions
    # of the biggest concept: one noun repeated in a short caption is fine.
    allowed = {id(r) for r in max(concepts, key=len)} if concepts else set()
    changed = sum(r.i2 - r.i1 + r.j2 - r.j1 for r in regions if id(r) not in allowed)
    similarity = 1.0 - changed / (len(src) + len(tgt))
    if len(src) >= 8 and similarity < 0.6 and len(regions) > 1:
        # Most of the source rewritten: the regions no longer line up with
        # meaning, so judge it as one rewrite (and colours over the whole text)
        found.add("structure_changed")
        if _colours(src, 0, len(src)) != _colours(tgt, 0, len(tgt)):
            found.add("color_change")
        regions_for_rules: list[_Region] = []
    else:
        regions_for_rules = regions
    kinds = {r.kind for r in regions_for_rules}
    if "insert" in kinds:
        found.add("added_content")
    if "delete" in kinds:
        found.add("removed_content")
    if "structure" in kinds:
        found.add("structure_changed")
    if regions_for_rules and (len(concepts) > 1 or any(r.kind == "concept" and (_fused_concepts(src, tgt, r) or _attribute_swap(src, tgt, r)) for r in regions_for_rules)):
        found.add("multiple_concepts")

    for r in regions_for_rules:
        if _colours(src, r.i1, r.i2) != _colours(tgt, r.j1, r.j2):
            found.add("color_change")
        if r.kind == "concept":
            sa = {lemma(w) for w in src[r.a1:r.i2]} & BUILDINGS
            sb = {lemma(w) for w in tgt[r.b1:r.j2]} & BUILDINGS
            if sa and sb and sa != sb:
                found.add("building_type")

    source_span = target_span = None
    if concepts:
        first = concepts[0][0]
        if first.i2 > first.a1:
            source_span = source[src_off[first.a1][0]:src_off[first.i2 - 1][1]]
        if first.j2 > first.b1:
            target_span = target[tgt_off[first.b1][0]:tgt_off[first.j2 - 1][1]]

    def span(offs: list[tuple[int, int]], i1: int, i2: int, end_of_text: int) -> tuple[int, int]:
        if i2 > i1:
            return (offs[i1][0], offs[i2 - 1][1])
        at = offs[i1][0] if i1 < len(offs) else end_of_text
        return (at, at)

    src_end = src_off[-1][1] if src_off else 0
    tgt_end = tgt_off[-1][1] if tgt_off else lo
    violations = tuple(r for r in RULES if r in found)
    return Verdict(
        passed=not violations,
        violations=violations,
        source_span=source_span,
        target_span=target_span,
        source_spans=tuple(span(src_off, r.i1, r.i2, src_end) for r in regions),
        target_spans=tuple(span(tgt_off, r.j1, r.j2, tgt_end) for r in regions),
    )
