"""CounterFact's facts asked as questions: a fixed question per relation, for the ``questions``
field (scored like rephrasings under ``--chat``).

ROME's ``counterfact.json`` names each case's relation (``requested_rewrite.relation_id``);
EasyEdit's layout does not, so its prompt is matched (subject replaced by ``{}``) against the
CounterFact prompt templates of each relation listed here. Templates that several relations
share ("{}, the", "{} plays") are left out: those cases get no question. docs/datasets.md states
the coverage.
"""
from __future__ import annotations

#: relation id -> (question with ``{}`` for the subject, CounterFact prompt templates of it).
RELATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "P103": ("What is the mother tongue of {}?",
             ("The mother tongue of {} is", "The native language of {} is", "{} is a native speaker of",
              "{}, a native")),
    "P1412": ("What language does {} speak?",
              ("{} speaks the language", "{} speaks", "{} spoke the language", "{}, speaker of", "{} writes in")),
    "P37": ("What is the official language of {}?",
            ("The official language of {} is", "In {}, an official language is", "The law in {} declares the language",
             "In {}, they understand", "In {}, the language spoken is")),
    "P364": ("What language is {} in?",
             ("The original language of {} is", "The original language of {} was", "The language of {} is",
              "The language of {} was", "The language used by {} is", "{} was written in")),
    "P190": ("What is the twin city of {}?",
             ("{} is a twin city of", "What is the twin city of {}? It is", "The twin city of {} is")),
    "P413": ("Which position does {} play?",
             ("{}, who plays the position", "{} plays in the position of", "Which position does {} play? They play as",
              "{} plays as", "{}'s position is")),
    "P176": ("Which company makes {}?",
             ("{} is created by", "{} was created by", "{}, developed by", "{}, created by", "{} is developed by", "{} is a product of",
              "{} is produced by", "{}, produced by", "{} was developed by")),
    "P27": ("Which country is {} a citizen of?",
            ("{} holds a citizenship from", "{} has a citizenship from", "{}, who has a citizenship from",
             "{}, a citizen of", "{} is a citizen of", "{}, who is a citizen of", "{}, who holds a citizenship from")),
    "P449": ("On which network did {} first air?",
             ("{} premieres on", "{} debuted on", "{} was released on", "{} is to debut on", "{} premiered on",
              "{} was originally aired on")),
    "P937": ("In which city did {} work?",
             ("{} worked in", "{} was employed in", "{} used to work in", "{} worked in the city of",
              "{} found employment in", "{} took up work in")),
    "P159": ("Where is the headquarters of {}?",
             ("The headquarter of {} is located in", "The headquarters of {} is in", "{}, whose headquarters are in",
              "{}'s headquarters are in", "The headquarter of {} is in", "{} is headquartered in", "{} is based in")),
    "P30": ("On which continent is {}?",
            ("{} is located in the continent", "{} belongs to the continent of", "{} is a part of the continent of")),
    "P17": ("In which country is {}?", ("{} is located in the country of",)),
    "P131": ("Where is {}?",
             ("{} is located in", "{}, in", "{} is in", "{} can be found in", "{}, located in", "{}, which is located in",
              "Where is {}? It is located in", "The location of {} is", "{} is within")),
    "P136": ("What genre of music does {} play?", ("The genre played by {} is", "{} is known for performing")),
    "P106": ("What is the occupation of {}?",
             ("The occupation of {} is", "{} works as", "The profession of {} is", "{}, who works as",
              "{}'s profession is a", "{}'s profession is an", "{}'s occupation is")),
    "P20": ("Where did {} die?",
            ("{} died at", "{} died in", "{} died in the city of", "{}'s life ended in", "{} passed away in",
             "{} passed away at", "{} lost their life at", "{} expired at", "{} succumbed at")),
    "P140": ("What religion does {} follow?",
             ("{} follows the religion of", "The official religion of {} is", "{} is follower of",
              "{} is affiliated with the religion")),
    "P495": ("Which country does {} come from?",
             ("{}, that was created in", "{}, created in", "{} was created in", "{}, that originated in",
              "{} was created in the country of", "{} originates from", "{} originated from", "{} originated in",
              "{} is originally from", "{} was originally from", "{}, from")),
    "P740": ("Where was {} founded?",
             ("{} formed in", "{} was formed in", "{}, that was formed in", "{} that was founded in",
              "{}, that was started in", "{} was formulated in")),
    "P108": ("Who does {} work for?", ("{} is employed by", "{} works for", "{}, who is employed by")),
    "P127": ("Who owns {}?", ("{}'s owner", "{} is owned by", "{} owner")),
    "P1303": ("Which instrument does {} play?",
              ("{} plays the instrument", "{}, playing the", "{} performs on the", "{}, performing on the")),
    "P641": ("Which sport does {} play?",
             ("{} professionally plays the sport", "What sport does {} play? They play")),
    "P101": ("What is the field of work of {}?",
             ("{} works in the field of", "The domain of work of {} is", "The domain of activity of {} is",
              "{}'s domain of activity is", "{}'s area of work is", "{} works in the area of", "{}'s expertise is")),
    "P39": ("What position does {} hold?", ("{}, who holds the position of", "{} holds the title of")),
}

#: CounterFact prompt template -> relation id.
TEMPLATE_RELATION: dict[str, str] = {t: rel for rel, (_, templates) in RELATIONS.items() for t in templates}


def question_for(prompt: str, subject: str, relation_id: str | None = None) -> str | None:
    """The question asking for the fact of a CounterFact case (by its relation when known, else
    by its prompt template), or None when the relation cannot be told."""
    rel = relation_id if relation_id in RELATIONS else TEMPLATE_RELATION.get(prompt.replace(subject, "{}", 1))
    return RELATIONS[rel][0].replace("{}", subject) if rel else None
