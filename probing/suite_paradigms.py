"""The bundled suite's minimal-pair grammars: one generator per paradigm, (rng, condition) -> one pair.

Every paradigm is lexically matched so that token identity cannot tell good from bad (issue 21): either the two
sentences hold the same words in another order (`lexically_identical`), or they differ in one controlled word whose
forms occur in good and bad sentences equally often, because the label is an interaction of two balanced factors
(the `conditions`: e.g. subject number x verb form). Words that move are never sentence-initial, so the good and
the bad sentence also hold the same tokens (a sentence-initial word is tokenised without its leading space).
Inflections come from lemminflect's tables.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from lemminflect import getInflection


def inflect(lemma: str, tag: str) -> str:
    return getInflection(lemma, tag)[0]


def sentence(*parts: str) -> str:
    """Join words into a sentence: first letter upper case, one full stop."""
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:] + "."


@dataclass(frozen=True)
class Pair:
    good: str
    bad: str


@dataclass(frozen=True)
class Paradigm:
    uid: str
    field: str  # the Holmes phenomenon
    linguistics_term: str
    lexically_identical: bool
    conditions: tuple[str, ...]  # balanced factor the generator receives; splits are stratified by it
    generate: Callable[[random.Random, str], Pair]
    about: str  # one line for the README: what makes good good
    blimp: tuple[str, ...] = ()  # BLiMP counterparts (UIDs), for the calibration


ANIMATE = ["dog", "cat", "teacher", "doctor", "farmer", "child", "bird", "horse", "student", "baker", "pilot",
           "nurse", "king", "girl", "boy", "lawyer", "singer", "rabbit", "painter", "driver", "man", "woman"]
# People: subjects of verbs that want a human.
AGENTS = ["teacher", "doctor", "farmer", "child", "student", "baker", "pilot", "nurse", "king", "girl", "boy",
          "lawyer", "singer", "painter", "driver", "man", "woman"]
OBJECTS = ["table", "book", "car", "stone", "cup", "box", "chair", "lamp", "bottle", "window", "shoe", "clock",
           "spoon", "door", "pencil", "basket", "coin", "ladder", "blanket", "bucket", "knife", "shelf", "glass",
           "watch", "dress", "photo"]
INTRANSITIVE = ["sleep", "laugh", "wait", "smile", "run", "sing", "swim", "work", "dance", "cry", "play", "rest",
                "eat", "talk", "sit", "read"]
PLACES = ["in the park", "near the river", "at the station", "in the garden", "at school", "every day", "at home",
          "in the morning", "after lunch", "on Sundays", "outside", "here"]
PREPOSITIONS = ["near", "behind", "beside", "with", "next to"]
FEMALE = ["Anna", "Mary", "Lucy", "Emma", "Kate", "Sarah", "Laura", "Rose"]
MALE = ["John", "Peter", "Tom", "David", "Mark", "Paul", "James", "Carl"]
NAMES = FEMALE + MALE
SINGULAR, PLURAL = "singular", "plural"


def noun_form(noun: str, number: str) -> str:
    return noun if number == SINGULAR else inflect(noun, "NNS")


def other(number: str) -> str:
    return PLURAL if number == SINGULAR else SINGULAR


# ---- morphology ---------------------------------------------------------------------------------------------
def _verb_forms(lemma: str, number: str) -> tuple[str, str]:
    """(agreeing, disagreeing) present-tense forms for a subject of `number`."""
    forms = {SINGULAR: inflect(lemma, "VBZ"), PLURAL: lemma}
    return forms[number], forms[other(number)]


def subject_verb_agreement(rng: random.Random, number: str) -> Pair:
    subject = noun_form(rng.choice(ANIMATE), number)
    agree, disagree = _verb_forms(rng.choice(INTRANSITIVE), number)
    tail = rng.choice(PLACES)
    return Pair(sentence("the", subject, agree, tail), sentence("the", subject, disagree, tail))


def subject_verb_agreement_attractor(rng: random.Random, number: str) -> Pair:
    """An attractor noun of the other number sits between subject and verb: agreement must skip it."""
    subject, attractor = noun_form(rng.choice(ANIMATE), number), noun_form(rng.choice(OBJECTS), other(number))
    agree, disagree = _verb_forms(rng.choice(INTRANSITIVE), number)
    middle = f"the {subject} {rng.choice(PREPOSITIONS)} the {attractor}"
    tail = rng.choice(PLACES)
    return Pair(sentence(middle, agree, tail), sentence(middle, disagree, tail))


DETERMINERS = {SINGULAR: ["this", "that"], PLURAL: ["these", "those"]}
PAST_VERBS = ["saw", "found", "took", "carried", "cleaned", "bought", "liked", "moved", "lifted", "sold", "washed",
              "noticed", "broke", "fixed", "painted", "dropped"]
ADJECTIVES = ["old", "new", "big", "small", "red", "blue", "heavy", "dirty", "clean", "broken", "cheap", "white"]
DET_NOUNS = OBJECTS + ["child", "man", "woman", "mouse", "dog", "horse"]  # a few irregular plurals among them


def determiner_noun_agreement(rng: random.Random, number: str) -> Pair:
    """The noun changes number under a fixed demonstrative; half the pairs put an adjective in between."""
    noun = rng.choice(DET_NOUNS)
    head = ["", rng.choice(ADJECTIVES)][rng.randrange(2)]
    start = [rng.choice(NAMES), rng.choice(PAST_VERBS), rng.choice(DETERMINERS[number]), head]
    return Pair(sentence(*start, noun_form(noun, number)), sentence(*start, noun_form(noun, other(number))))


# Verbs whose past tense and past participle differ, with objects they take.
IRREGULAR = {"take": ["the book", "the bus", "a photo"], "write": ["a letter", "the report", "a song"],
             "see": ["the film", "the sea", "a ghost"], "eat": ["the apple", "the cake", "the soup"],
             "break": ["the cup", "the window", "the rule"], "drive": ["the car", "the truck", "the bus"],
             "choose": ["the red dress", "the winner", "a book"], "steal": ["the money", "a bike", "the car"],
             "draw": ["a map", "a picture", "a circle"], "throw": ["the ball", "a stone", "the paper"],
             "know": ["the answer", "the truth", "the way"], "begin": ["the test", "the work", "a new book"],
             "sing": ["the song", "a hymn", "the anthem"], "drink": ["the milk", "the tea", "the water"],
             "ride": ["the horse", "a bike", "the train"], "hide": ["the key", "the money", "the letter"],
             "forget": ["the name", "the date", "the key"], "shake": ["the box", "the bottle", "the tree"],
             "wear": ["the coat", "a hat", "the blue dress"], "tear": ["the paper", "the shirt", "the map"],
             "fly": ["the plane", "a kite", "the drone"], "grow": ["tomatoes", "a beard", "roses"],
             "speak": ["the truth", "French", "a few words"], "give": ["a speech", "the answer", "a talk"],
             "freeze": ["the meat", "the water", "the bread"]}
HAS, NO_AUX = "has", "no_aux"


def irregular_past_participle(rng: random.Random, aux: str) -> Pair:
    """`has` + participle / bare past tense are good; `has` + past tense / bare participle are bad."""
    verb = rng.choice(sorted(IRREGULAR))
    past, participle = inflect(verb, "VBD"), inflect(verb, "VBN")
    start, obj = [rng.choice(NAMES), rng.choice(["has", "had"]) if aux == HAS else ""], rng.choice(IRREGULAR[verb])
    good, bad = (participle, past) if aux == HAS else (past, participle)
    return Pair(sentence(*start, good, obj), sentence(*start, bad, obj))


# ---- syntax -------------------------------------------------------------------------------------------------
EMBEDDING = ["knows", "forgot", "remembers", "found out", "noticed", "wondered", "asked"]
GAP, NO_GAP = "gap", "no_gap"
TRANSITIVE_PAST = ["saw", "helped", "called", "liked", "followed", "visited", "met", "praised", "blamed"]


def filler_gap(rng: random.Random, gap: str) -> Pair:
    """`who` needs a gap, `that` needs none: the pair differs in who/that, the gap decides which is good."""
    matrix = [rng.choice(NAMES), rng.choice(EMBEDDING[:5])]
    clause = ["the", rng.choice(AGENTS), rng.choice(TRANSITIVE_PAST)]
    clause += [] if gap == GAP else ["the", rng.choice(AGENTS)]
    clause += [rng.choice(["", "yesterday", "at school", "last week"])]
    good, bad = ("who", "that") if gap == GAP else ("that", "who")
    return Pair(sentence(*matrix, good, *clause), sentence(*matrix, bad, *clause))


# English adjective order: a category earlier in this list precedes a later one.
ADJECTIVE_ORDER = [["lovely", "beautiful", "ugly", "nice", "strange"], ["big", "small", "tiny", "huge", "large"],
                   ["old", "new", "ancient", "modern"], ["red", "blue", "green", "black", "white", "yellow"],
                   ["French", "Italian", "Chinese", "German"], ["wooden", "plastic", "metal"]]
ORDER_NOUNS = ["box", "chair", "table", "bag", "cup", "hat", "ball", "lamp", "bowl", "clock", "toy", "bench"]


def adjective_order(rng: random.Random, _: str) -> Pair:
    """Two adjectives of different categories in canonical order (good) or swapped (bad)."""
    first, second = sorted(rng.sample(range(len(ADJECTIVE_ORDER)), 2))
    a, b = rng.choice(ADJECTIVE_ORDER[first]), rng.choice(ADJECTIVE_ORDER[second])
    start, noun = [rng.choice(NAMES), rng.choice(["bought", "found", "sold", "liked", "painted"]), "the"], \
        rng.choice(ORDER_NOUNS)
    return Pair(sentence(*start, a, b, noun), sentence(*start, b, a, noun))


NPI_PREDICATES = ["smiled", "laughed", "cried", "lied", "complained", "slept there", "been late", "given up"]


def npi_scope(rng: random.Random, _: str) -> Pair:
    """`ever` is licensed by `no` in the main clause, not by `no` inside a relative clause: no and the swap."""
    opener, (n1, n2) = rng.choice(["I think", "they say", "we know", "it seems that"]), rng.sample(AGENTS, 2)
    rel, tail = rng.choice(TRANSITIVE_PAST), rng.choice(NPI_PREDICATES)
    good = sentence(opener, "no", n1, "that the", n2, rel, "has ever", tail)
    bad = sentence(opener, "the", n1, "that no", n2, rel, "has ever", tail)
    return Pair(good, bad)


# ---- semantics ----------------------------------------------------------------------------------------------
HYPONYMS = {"animals": ["dogs", "cats", "lions", "horses", "wolves", "cows", "spiders", "rabbits"],
            "birds": ["sparrows", "eagles", "owls", "crows", "parrots"], "flowers": ["roses", "tulips", "daisies",
                                                                                     "lilies"],
            "trees": ["oaks", "pines", "maples", "birches"], "vehicles": ["cars", "trucks", "buses", "bicycles"],
            "tools": ["hammers", "saws", "drills", "wrenches"], "instruments": ["violins", "guitars", "pianos",
                                                                                "drums"],
            "fruits": ["apples", "bananas", "oranges", "pears"], "vegetables": ["carrots", "potatoes", "onions"],
            "shapes": ["squares", "circles", "triangles"]}
UNIVERSAL, EXISTENTIAL = "all", "some_not"
OPENERS = ["", "in fact,", "of course,", "as we know,", "everyone knows that", "it is true that"]


def quantifier_hypernymy(rng: random.Random, quantifier: str) -> Pair:
    """`all X are Y` holds for X a kind of Y; `some Y are not X` holds too; swapping X and Y breaks both."""
    hyper = rng.choice(sorted(HYPONYMS))
    hypo, opener = rng.choice(HYPONYMS[hyper]), rng.choice(OPENERS)
    if quantifier == UNIVERSAL:
        return Pair(sentence(opener, "all", hypo, "are", hyper), sentence(opener, "all", hyper, "are", hypo))
    return Pair(sentence(opener, "some", hyper, "are not", hypo), sentence(opener, "some", hypo, "are not", hyper))


PAST, FUTURE = "past", "future"
TIME_ADVERBS = [("yesterday", "tomorrow"), ("last week", "next week"), ("last year", "next year"),
                ("last month", "next month"), ("last summer", "next summer")]
TENSE_VERBS = {"visit": ["the museum", "the farm", "her aunt"], "clean": ["the kitchen", "the car", "the windows"],
               "paint": ["the fence", "the door", "a picture"], "sell": ["the house", "the bike", "the old car"],
               "read": ["the book", "the letter", "the report"], "fix": ["the roof", "the lamp", "the bike"],
               "buy": ["a new car", "some bread", "a ticket"], "win": ["the race", "the game", "a prize"],
               "meet": ["the mayor", "the new boss", "the doctor"], "leave": ["the city", "the party", "early"]}


def tense_adverb_agreement(rng: random.Random, tense: str) -> Pair:
    """A past verb wants a past adverb, `will` a future one; the pair differs in the adverb's last/next word."""
    past, future = rng.choice(TIME_ADVERBS)
    verb = rng.choice(sorted(TENSE_VERBS))
    body = ["the", rng.choice(AGENTS), inflect(verb, "VBD") if tense == PAST else f"will {verb}",
            rng.choice(TENSE_VERBS[verb])]
    good, bad = (past, future) if tense == PAST else (future, past)
    return Pair(sentence(*body, good), sentence(*body, bad))


# Verbs that need an animate subject, with inanimate objects they take.
AGENT_VERBS = {"ate": ["the apple", "the sandwich", "the cake", "the carrot"],
               "read": ["the book", "the letter", "the newspaper", "the menu"],
               "washed": ["the cup", "the spoon", "the shirt", "the plate"],
               "opened": ["the letter", "the box", "the jar", "the envelope"],
               "dropped": ["the cup", "the key", "the pencil", "the spoon"],
               "painted": ["the fence", "the box", "the chair", "the wall"],
               "wrote": ["the letter", "the poem", "the note", "the list"],
               "cooked": ["the soup", "the rice", "the egg", "the fish"],
               "folded": ["the shirt", "the towel", "the map", "the paper"]}


def animacy_selection(rng: random.Random, _: str) -> Pair:
    """An animate agent acts on a thing (good); swapping subject and object makes the thing act (bad)."""
    verb = rng.choice(sorted(AGENT_VERBS))
    agent, thing = f"the {rng.choice(AGENTS)}", rng.choice(AGENT_VERBS[verb])
    opener = rng.choice(["yesterday", "this morning", "then", "at noon", "suddenly"])
    return Pair(sentence(opener, agent, verb, thing), sentence(opener, thing, verb, agent))


# ---- reasoning ----------------------------------------------------------------------------------------------
LARGER, SMALLER = "larger", "smaller"


def numeric_comparison(rng: random.Random, relation: str) -> Pair:
    """`the number a is larger than b`, true (good) or with a and b swapped (bad)."""
    high, low = sorted(rng.sample(range(1, 100), 2), reverse=True)
    first, second = (high, low) if relation == LARGER else (low, high)
    frame = ["the number", "{}", "is", relation, "than", "{}"]
    good = sentence(*frame).format(first, second)
    return Pair(good, sentence(*frame).format(second, first))


COMPARATIVES = ["taller", "older", "faster", "stronger", "richer", "heavier", "shorter", "younger"]
FORWARD, BACKWARD = "forward", "backward"


def transitivity(rng: random.Random, order: str) -> Pair:
    """Two premises a > b, b > c; the conclusion a > c (good) or c > a (bad). Premises in either order."""
    a, b, c = rng.sample(NAMES, 3)
    adjective = rng.choice(COMPARATIVES)
    premises = [f"{a} is {adjective} than {b}.", f"{b} is {adjective} than {c}."]
    if order == BACKWARD:
        premises.reverse()
    given = " ".join(premises) + " " + rng.choice(["So", "Therefore,", "Hence"])
    return Pair(f"{given} {a} is {adjective} than {c}.", f"{given} {c} is {adjective} than {a}.")


TRUE_FACTS = [("fish", "live in water"), ("birds", "have feathers"), ("ice", "is cold"), ("fire", "is hot"),
              ("the sun", "rises in the east"), ("dogs", "have four legs"), ("snow", "is white"),
              ("squares", "have four corners"), ("triangles", "have three sides"), ("water", "is wet"),
              ("cats", "have whiskers"), ("spiders", "have eight legs"), ("a week", "has seven days"),
              ("fresh milk", "is white"), ("dead leaves", "fall down"), ("people", "need air"),
              ("plants", "need water"), ("a year", "has twelve months"), ("bees", "have wings"),
              ("the sea", "tastes of salt")]
FALSE_FACTS = [("stones", "can fly"), ("cows", "lay eggs"), ("trees", "can talk"), ("fish", "climb ladders"),
               ("horses", "have wings"), ("books", "can swim"), ("chairs", "eat bread"), ("snakes", "have legs"),
               ("rocks", "grow hair"), ("the moon", "is made of cheese"), ("cars", "grow on trees"),
               ("a week", "has ten days"), ("ice", "is hot"), ("fire", "is cold"), ("cats", "have feathers"),
               ("squares", "have five corners"), ("babies", "drive buses"), ("shoes", "sing songs"),
               ("the sun", "rises in the west"), ("clouds", "are made of stone")]
TRUE, FALSE = "true_fact", "false_fact"


def always_never(rng: random.Random, truth: str) -> Pair:
    """`always` with a true generalisation, `never` with a false one, are good; the other adverb is bad."""
    subject, predicate = rng.choice(TRUE_FACTS if truth == TRUE else FALSE_FACTS)
    opener = rng.choice(OPENERS)
    good, bad = ("always", "never") if truth == TRUE else ("never", "always")
    if predicate.split(" ")[0] in ("can", "is", "are"):  # `can always fly`, `is never hot`
        verb, rest = predicate.split(" ", 1)
        return Pair(sentence(opener, subject, verb, good, rest), sentence(opener, subject, verb, bad, rest))
    return Pair(sentence(opener, subject, good, predicate), sentence(opener, subject, bad, predicate))


# ---- discourse ----------------------------------------------------------------------------------------------
# Two events in their natural order; {p} is the subject pronoun, {s} the possessive.
EVENT_PAIRS = [("{p} opened the door", "{p} walked into the room"), ("{p} planted the seeds", "{p} watered them"),
               ("{p} heard the alarm", "{p} got out of bed"), ("{p} bought a ticket", "{p} got on the train"),
               ("{p} wrote a letter", "{p} posted it"), ("{p} cooked dinner", "{p} washed the dishes"),
               ("{p} boiled the water", "{p} made some tea"), ("{p} found {s} keys", "{p} drove to work"),
               ("{p} packed {s} bag", "{p} left for the airport"), ("{p} read the book", "{p} gave it back"),
               ("{p} filled the bath", "{p} got in"), ("{p} picked up the phone", "{p} said hello"),
               ("{p} caught the ball", "{p} threw it back"), ("{p} put on {s} coat", "{p} went outside"),
               ("{p} sat down at the table", "{p} ate {s} lunch"), ("{p} climbed the hill", "{p} enjoyed the view"),
               ("{p} lit the candle", "{p} blew it out"), ("{p} took off {s} shoes", "{p} went to sleep"),
               ("{p} broke the glass", "{p} swept up the pieces"), ("{p} paid the bill", "{p} left the shop"),
               ("{p} turned off the light", "{p} fell asleep"), ("{p} washed the apple", "{p} ate it"),
               ("{p} opened the letter", "{p} read it"), ("{p} knocked on the door", "{p} waited for an answer"),
               ("{p} dropped the plate", "{p} said sorry")]
STORY_OPENERS = ["It was a quiet day.", "This is what happened.", "Here is the story.", "It was early morning.",
                 "It was a long evening."]
PRONOUNS = {"she": ("She", "her"), "he": ("He", "his")}


def event_order(rng: random.Random, gender: str) -> Pair:
    """Two event sentences in their natural order (good) or swapped (bad), after a fixed opening sentence."""
    first, second = rng.choice(EVENT_PAIRS)
    p, s = PRONOUNS[gender]
    first, second = first.format(p=p, s=s) + ".", second.format(p=p, s=s) + "."
    opener = rng.choice(STORY_OPENERS)
    return Pair(f"{opener} {first} {second}", f"{opener} {second} {first}")


# (cause, result): the causal order so/because must respect.
CAUSES = [("it was raining", "we stayed inside"), ("she was tired", "she went to bed early"),
          ("the shop was closed", "he went home"), ("the soup was hot", "he waited a minute"),
          ("the test was easy", "everyone passed"), ("the road was icy", "the driver slowed down"),
          ("the baby was hungry", "her mother fed her"), ("the film was boring", "many people left early"),
          ("the box was heavy", "two men carried it"), ("the lamp was broken", "the room was dark"),
          ("the train was late", "we missed the meeting"), ("the water was cold", "nobody went swimming"),
          ("he studied hard", "he passed the exam"), ("the door was locked", "she used her key"),
          ("the bread was old", "they threw it away"), ("the music was loud", "the neighbours complained"),
          ("the bus broke down", "they walked to town"), ("she lost her glasses", "she could not read"),
          ("the river flooded", "the bridge was closed"), ("he forgot his wallet", "he could not pay"),
          ("the sun came out", "the snow melted"), ("the milk was sour", "she threw it out")]
SO, BECAUSE = "so", "because"
CAUSE_OPENERS = ["on Monday", "that evening", "last winter", "one day", "in the story", "that morning"]


def causal_order(rng: random.Random, connective: str) -> Pair:
    """`cause, so result` and `result because cause` are good; swapping the two clauses is bad."""
    cause, result = rng.choice(CAUSES)
    opener = rng.choice(CAUSE_OPENERS)
    if connective == SO:
        return Pair(sentence(opener, f"{cause}, so", result), sentence(opener, f"{result}, so", cause))
    return Pair(sentence(opener, result, "because", cause), sentence(opener, cause, "because", result))


# Who the pronoun must be: `{a}` and `{b}` are the two names, {pb}/{ob}/{sb} b's pronouns (subject/object/possessive),
# {oa}/{sa} a's. The frame is coherent with a and b in this order; swapping the names breaks it.
COREFERENCE_FRAMES = ["{a} thanked {b} because {pb} had helped {oa}", "{a} paid {b} because {pb} had fixed {sa} car",
                      "{a} congratulated {b} because {pb} had won the race",
                      "{a} blamed {b} because {pb} had broken {sa} cup",
                      "{a} forgave {b} because {pb} had said sorry to {oa}",
                      "{a} visited {b} because {pb} was ill and needed {oa}",
                      "{a} apologised to {b} because {pa} had been rude to {ob}",
                      "{a} called {b} because {pa} wanted to hear {sb} news"]
GENDER = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}
A_FEMALE, A_MALE = "a_female", "a_male"


def coreference(rng: random.Random, who: str) -> Pair:
    """A frame whose pronouns fix who did what; names of different genders, swapped in the bad sentence."""
    female, male = rng.choice(FEMALE), rng.choice(MALE)
    (a, ga), (b, gb) = ((female, "she"), (male, "he")) if who == A_FEMALE else ((male, "he"), (female, "she"))
    roles = {"pa": GENDER[ga][0], "oa": GENDER[ga][1], "sa": GENDER[ga][2],
             "pb": GENDER[gb][0], "ob": GENDER[gb][1], "sb": GENDER[gb][2]}
    frame, opener = rng.choice(COREFERENCE_FRAMES), rng.choice(["yesterday", "last week", "on Friday", "that day"])
    return Pair(sentence(opener, frame.format(a=a, b=b, **roles)), sentence(opener, frame.format(a=b, b=a, **roles)))


PARADIGMS = [
    Paradigm("subject_verb_agreement", "morphology", "subject_verb_agreement", False, (SINGULAR, PLURAL),
             subject_verb_agreement, "present verb agrees with a singular or plural subject",
             ("regular_plural_subject_verb_agreement_1",)),
    Paradigm("subject_verb_agreement_attractor", "morphology", "subject_verb_agreement", False, (SINGULAR, PLURAL),
             subject_verb_agreement_attractor, "agreement with the subject across a PP attractor of the other number",
             ("distractor_agreement_relational_noun",)),
    Paradigm("determiner_noun_agreement", "morphology", "determiner_noun_agreement", False, (SINGULAR, PLURAL),
             determiner_noun_agreement, "noun number agrees with this/that/these/those (half with an adjective)",
             ("determiner_noun_agreement_1", "determiner_noun_agreement_with_adjective_1")),
    Paradigm("irregular_past_participle", "morphology", "irregular_forms", False, (HAS, NO_AUX),
             irregular_past_participle, "has + participle / bare past tense of verbs whose two forms differ",
             ("irregular_past_participle_verbs",)),
    Paradigm("filler_gap", "syntax", "filler_gap_dependency", False, (GAP, NO_GAP), filler_gap,
             "`who` with a gap, `that` without one", ("wh_vs_that_with_gap", "wh_vs_that_no_gap")),
    Paradigm("adjective_order", "syntax", "adjective_order", True, ("",), adjective_order,
             "opinion < size < age < colour < origin < material; bad swaps the two adjectives"),
    Paradigm("npi_scope", "syntax", "npi_licensing", True, ("",), npi_scope,
             "`ever` licensed by `no` in the main clause; bad moves `no` into the relative clause",
             ("sentential_negation_npi_scope",)),
    Paradigm("quantifier_hypernymy", "semantics", "quantifiers", True, (UNIVERSAL, EXISTENTIAL),
             quantifier_hypernymy, "all <kind> are <hypernym> / some <hypernym> are not <kind>; bad swaps the nouns"),
    Paradigm("tense_adverb_agreement", "semantics", "tense", False, (PAST, FUTURE), tense_adverb_agreement,
             "past verb with last/yesterday, will with next/tomorrow"),
    Paradigm("animacy_selection", "semantics", "s-selection", True, ("",), animacy_selection,
             "an animate agent acts on a thing; bad swaps subject and object", ("animate_subject_trans",)),
    Paradigm("numeric_comparison", "reasoning", "numeric_comparison", True, (LARGER, SMALLER), numeric_comparison,
             "`the number a is larger/smaller than b` true; bad swaps the numbers"),
    Paradigm("transitivity", "reasoning", "transitive_inference", True, (FORWARD, BACKWARD), transitivity,
             "a > b, b > c, so a > c; bad concludes c > a"),
    Paradigm("always_never", "reasoning", "world_knowledge", False, (TRUE, FALSE), always_never,
             "`always` with a true generalisation, `never` with a false one"),
    Paradigm("event_order", "discourse", "sentence_order", True, ("she", "he"), event_order,
             "two event sentences in their natural order; bad swaps them"),
    Paradigm("causal_order", "discourse", "connectives", True, (SO, BECAUSE), causal_order,
             "cause, so result / result because cause; bad swaps the clauses"),
    Paradigm("coreference", "discourse", "coreference", True, (A_FEMALE, A_MALE), coreference,
             "pronouns fix who did what; bad swaps the two names"),
]
