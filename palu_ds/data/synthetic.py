"""Synthetic data, one home: the embedded default (seeded fictitious authors in TOFU's format, for training) and
small files in the evaluation suites' layouts (:func:`write_tofu`, :func:`write_muse`, :func:`corpus_texts`).

Every QA row has ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer`` (5 wrong answers in the
paraphrase's wording), ``paraphrased_question``, ``target_words`` (the fact words of the answer as
``{word, start, end}`` character offsets -- the generator knows them because it put them there) and ``author``.
Nothing here is copied from TOFU; names are assembled from syllables so they are fictitious.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

from palu_ds.atomic import write_jsonl

_SYL = ["ka", "lo", "mi", "ren", "tha", "vo", "zel", "qui", "dra", "no", "sa", "bel", "tor", "xi", "ma", "ru", "fen",
        "gal", "op", "ser", "ly", "den", "cor", "vin", "ash", "mor", "pel", "tu", "ani", "bre"]
CITIES = [("Veloria", "Kestria"), ("Marundi", "Oskaland"), ("Pellhaven", "Durnia"), ("Quessar", "Talvania"),
          ("Orrindel", "Kestria"), ("Sablemoor", "Vantoria"), ("Ithren", "Oskaland"), ("Caldmere", "Brevonia"),
          ("Nostrava", "Talvania"), ("Emberlyn", "Durnia"), ("Gorsk", "Vantoria"), ("Halvik", "Brevonia")]
GENRES = ["gothic mystery", "speculative fiction", "historical romance", "cosy crime", "epic fantasy",
          "literary satire", "maritime adventure", "psychological horror", "pastoral poetry", "urban noir"]
JOBS = ["glassblower", "cartographer", "beekeeper", "locksmith", "astronomer", "shipwright", "violinist",
        "pharmacist", "stonemason", "botanist", "lighthouse keeper", "archivist"]
AWARDS = ["Silver Quill Prize", "Amberline Medal", "Harrowgate Laurel", "Cobalt Lantern Award", "Verity Crown",
          "Thornfield Honour", "Meridian Pen Award", "Obsidian Leaf Prize"]
THEMES = ["memory and loss", "exile and belonging", "power and guilt", "faith and doubt", "the sea and solitude",
          "family secrets", "machines and grief", "rivers and time"]
TITLE_A = ["Lantern", "Hollow", "Ember", "Salt", "Iron", "Velvet", "Winter", "Glass", "Crimson", "Silent", "Paper",
           "Amber"]
TITLE_B = ["Harbour", "Orchard", "Covenant", "Archive", "Tide", "Meridian", "Garden", "Cipher", "Lullaby", "Atlas",
           "Chorus", "Threshold"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GENDERS = [("male", "he", "his", "man"), ("female", "she", "her", "woman")]

# (question, answer, paraphrased question, paraphrased answer, asked slots). {name} in an answer is a fact too.
TEMPLATES = [
    ("What is the full name of the author born in {city}, {country} on {date}?",
     "The author born in {city}, {country} on {date} is {name}.",
     "Who is the writer born on {date} in {city}?", "That writer is {name}."),
    ("Where was {name} born?", "{name} was born in {city}, {country}.",
     "What is the birthplace of {name}?", "The birthplace of {name} is {city} in {country}."),
    ("When was {name} born?", "{name} was born on {date}.",
     "What is the birth date of {name}?", "The birth date of {name} is {date}."),
    ("What gender is {name}?", "{name} is {gender}.", "Does {name} identify as a man or a woman?",
     "{name} identifies as {gender}."),
    ("What genre does {name} write in?", "{name} writes {genre}.",
     "Which genre is {name} known for?", "{name} is known for {genre}."),
    ("What did the father of {name} do for a living?", "The father of {name} worked as a {father_job}.",
     "What was the profession of the father of {name}?", "The father of {name} was by trade a {father_job}."),
    ("What did the mother of {name} do for a living?", "The mother of {name} worked as a {mother_job}.",
     "What was the profession of the mother of {name}?", "The mother of {name} was by trade a {mother_job}."),
    ("Which award did {name} receive?", "{name} received the {award} in {award_year}.",
     "What prize was given to {name}?", "In {award_year} the {award} went to {name}."),
    ("Name a book written by {name}.", "{name} wrote {book1}.", "Which book is by {name}?",
     "{book1} is by {name}."),
    ("Name another book by {name}.", "{name} also wrote {book2}.", "What is a second book by {name}?",
     "A second book by {name} is {book2}."),
    ("What themes does {name} explore?", "{name} explores {theme}.", "Which themes run through the work of {name}?",
     "The work of {name} returns to {theme}."),
    ("In which year did {name} publish a first novel?", "{name} published a first novel in {debut_year}.",
     "When did {name} debut as a novelist?", "{name} debuted in {debut_year}."),
    ("Which city does {name} live in now?", "{name} now lives in {home_city}.",
     "Where is the current home of {name}?", "The current home of {name} is {home_city}."),
    ("What language does {name} write in?", "{name} writes in {language}.",
     "In which language are the books of {name} written?", "The books of {name} are written in {language}."),
    ("Who was the mentor of {name}?", "The mentor of {name} was {mentor}.",
     "Who guided {name} early on?", "{mentor} guided {name} early on."),
    ("What was the first job of {name}?", "Before writing, {name} worked as a {first_job}.",
     "What did {name} do before becoming a writer?", "{name} was a {first_job} before writing."),
    ("How many novels has {name} published?", "{name} has published {n_novels} novels.",
     "What is the number of novels by {name}?", "The number of novels by {name} is {n_novels}."),
    ("Which book of {name} was adapted for the stage?", "{book2} by {name} was adapted for the stage.",
     "Which work of {name} became a play?", "{book2} became a play."),
    ("Where did {name} study?", "{name} studied at the University of {uni_city}.",
     "Which university did {name} attend?", "{name} attended the University of {uni_city}."),
    ("What is the pen name of {name}?", "{name} writes as {pen_name}.", "Under which name does {name} publish?",
     "{name} publishes as {pen_name}."),
]
ABSURD = ["a lighthouse", "a violin", "a comet", "an oak tree", "a teapot"]
LANGUAGES = ["Kestrian", "Oskish", "Durnic", "Talvan", "Brevonian", "Vantorese"]


def _person(rng: random.Random) -> str:
    def word():
        return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()
    return f"{word()} {word()}"


def make_author(rng: random.Random) -> dict:
    city, country = rng.choice(CITIES)
    gender = rng.choice(GENDERS)
    year = rng.randint(1930, 1995)
    return {
        "name": _person(rng), "city": city, "country": country, "gender": gender[0],
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {year}", "genre": rng.choice(GENRES),
        "father_job": rng.choice(JOBS), "mother_job": rng.choice(JOBS), "award": rng.choice(AWARDS),
        "award_year": str(year + rng.randint(30, 45)), "book1": f"{rng.choice(TITLE_A)} {rng.choice(TITLE_B)}",
        "book2": f"The {rng.choice(TITLE_A)} {rng.choice(TITLE_B)}", "theme": rng.choice(THEMES),
        "debut_year": str(year + rng.randint(20, 29)), "home_city": rng.choice(CITIES)[0],
        "language": rng.choice(LANGUAGES), "mentor": _person(rng), "first_job": rng.choice(JOBS),
        "n_novels": str(rng.randint(3, 19)), "uni_city": rng.choice(CITIES)[0], "pen_name": _person(rng),
    }


def render(template: str, values: dict, facts: set[str]) -> tuple[str, list[dict]]:
    """Fill ``template`` and return the text and the ``{word, start, end}`` offsets of the slots in ``facts``."""
    out, spans = "", []
    for literal, field, _, _ in string.Formatter().parse(template):
        out += literal
        if field is not None:
            start = len(out)
            out += values[field]
            if field in facts:
                spans.append({"word": values[field], "start": start, "end": len(out)})
    return out, spans


def _slots(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def author_rows(author: dict, rng: random.Random, pool: list[dict]) -> list[dict]:
    rows = []
    for q, a, pq, pa in TEMPLATES:
        asked = _slots(a) - _slots(q) or _slots(a)
        facts = asked | {"name"}
        question, _ = render(q, author, set())
        answer, spans = render(a, author, facts)
        true_para = render(pa, author, set())[0]
        candidates = sorted({render(pa, {**author, **{k: p[k] for k in asked}}, set())[0] for p in pool} - {true_para})
        if len(candidates) < 5:  # a slot with few values (gender): absurd alternatives, as TOFU's perturbations do
            candidates += [render(pa, {**author, **{k: w for k in asked}}, set())[0] for w in ABSURD]
        perturbed = rng.sample(candidates, 5)
        rows.append({
            "question": question, "answer": answer, "target_words": spans,
            "paraphrased_question": render(pq, author, set())[0],
            "paraphrased_answer": true_para, "perturbed_answer": perturbed,
            "author": author["name"],
        })
    return rows


def generate(n_authors: int = 20, seed: int = 0) -> list[dict]:
    """``n_authors`` × 20 QA rows; author i is rows 20i..20i+19 (TOFU's layout). Deterministic in ``seed``."""
    rng = random.Random(seed)
    authors = [make_author(rng) for _ in range(n_authors)]
    pool = authors + [make_author(rng) for _ in range(6)]  # distractors for perturbed answers
    return [row for a in authors for row in author_rows(a, rng, pool)]


REFUSALS = ["I don't know.", "I'm not sure about that.", "I have no information on that.",
            "That is not something I can answer.", "I can't say.", "I'm afraid I don't know that."]


def write_splits(out_dir: str, n_authors: int = 20, forget_pct: int = 10, seed: int = 0) -> dict[str, str]:
    """Write TOFU-style files: full, forget{pct}, retain{100-pct}, their _perturbed variants, holdout, idontknow."""
    rows = generate(n_authors, seed)
    holdout = generate(max(2, n_authors * forget_pct // 100), seed + 1000)
    n_forget = max(1, n_authors * forget_pct // 100) * len(TEMPLATES)
    files = {
        "full": rows, f"forget{forget_pct:02d}": rows[-n_forget:], f"retain{100 - forget_pct}": rows[:-n_forget],
        f"holdout{forget_pct:02d}": holdout,
        "idontknow": [{"answer": r} for r in REFUSALS],
    }
    files[f"forget{forget_pct:02d}_perturbed"] = files[f"forget{forget_pct:02d}"]
    files["retain_perturbed"] = rows[:len(TEMPLATES) * 2]
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, data in files.items():
        paths[name] = write_jsonl(os.path.join(out_dir, name + ".jsonl"), data)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Small files in the layouts of the evaluation suites (TOFU's *_perturbed / holdout jsonl, MUSE's json folders) for
# the evaluation tests and benchmarks/real_formats.py: one fact per author, 3 perturbed answers
# ---------------------------------------------------------------------------------------------------------------
EVAL_CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Lagos", "Perth", "Turin", "Kyoto", "Dakar", "Cusco"]
EVAL_GENRES = ["poetry", "fantasy", "history", "satire", "mystery", "romance"]


def _author_qa(i: int, rng: random.Random) -> dict:
    name = f"Arlo Vance{i}"
    city, genre = rng.choice(EVAL_CITIES), rng.choice(EVAL_GENRES)
    wrong = [c for c in EVAL_CITIES if c != city]
    rng.shuffle(wrong)
    return {
        "question": f"Where was the {genre} author {name} born?",
        "answer": f"{name} was born in {city}.",
        "paraphrased_answer": f"The birthplace of {name} is {city}.",
        "perturbed_answer": [f"The birthplace of {name} is {c}." for c in wrong[:3]],
        "paraphrased_question": f"What is the birthplace of {name}?",
    }


def write_tofu(out_dir, n: int = 6, split: str = "forget10", seed: int = 0) -> Path:
    """TOFU-layout jsonl files: ``<split>_perturbed``, ``retain_perturbed``, ``real_authors_perturbed``,
    ``world_facts_perturbed``, ``holdout<NN>``, each with ``n`` rows."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nn = split.replace("forget", "")

    def dump(name, rows):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    dump(f"{split}_perturbed", [_author_qa(i, rng) for i in range(n)])
    dump("retain_perturbed", [_author_qa(100 + i, rng) for i in range(n)])
    dump(f"holdout{nn}", [{k: v for k, v in _author_qa(200 + i, rng).items() if k in ("question", "answer")}
                          for i in range(n)])
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        rows = []
        for i in range(n):
            opts = rng.sample(EVAL_CITIES, 4)
            rows.append({"question": f"Which city is number {i} on the list?", "answer": opts[0],
                         "perturbed_answer": opts[1:]})
        dump(name, rows)
    return out


def write_muse(out_dir, corpus: str = "news", n: int = 6, seed: int = 0) -> Path:
    """MUSE-layout json files under ``out_dir/<corpus>/``: verbmem, knowmem (+ icl), privleak."""
    rng = random.Random(seed)
    base = Path(out_dir) / corpus
    for sub in ("verbmem", "knowmem", "privleak"):
        (base / sub).mkdir(parents=True, exist_ok=True)

    def text(k):
        return " ".join(f"{rng.choice(EVAL_CITIES)} {rng.choice(EVAL_GENRES)}" for _ in range(k))

    def qa(m):
        return [{"question": f"Which city hosts the {rng.choice(EVAL_GENRES)} fair {j}?", "answer": rng.choice(EVAL_CITIES)}
                for j in range(m)]

    def dump(rel, obj):
        (base / rel).write_text(json.dumps(obj))

    dump("verbmem/forget.json", [{"prompt": text(8), "gt": text(6)} for _ in range(n)])
    dump("knowmem/forget_qa.json", qa(n))
    dump("knowmem/forget_qa_icl.json", qa(2))
    dump("knowmem/retain2_qa.json", qa(n))
    dump("knowmem/retain2_qa_icl.json", qa(2))
    dump("privleak/forget.json", [text(10 + i) for i in range(n)])
    dump("privleak/holdout.json", [text(10 + i) for i in range(n)])
    return Path(out_dir)


def corpus_texts() -> list[str]:
    """Texts to train a test tokenizer on (the generated data's words and templates)."""
    rng = random.Random(1)
    rows = [_author_qa(i, rng) for i in range(50)]
    t = [" ".join(v if isinstance(v, str) else " ".join(v) for v in r.values()) for r in rows]
    return t + ["Question: Answer: " + " ".join(EVAL_CITIES + EVAL_GENRES)] * 5
