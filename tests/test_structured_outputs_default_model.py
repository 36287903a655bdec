"""Structured outputs on the real default model (SmolLM2-135M-Instruct): JSON extraction under a
nested schema, and classification with choices."""

from __future__ import annotations

import json

import jsonschema
import pytest

from fxllm import LLM, SamplingParams
from fxllm.sampling_params import StructuredOutputsParams

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.slow

NAME = {"type": "string", "maxLength": 40}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": NAME,
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "occupation": {"enum": ["engineer", "teacher", "doctor", "artist", "farmer", "student", "chef", "other"]},
        "home": {
            "type": "object",
            "properties": {"city": NAME, "country": NAME},
            "required": ["city", "country"],
        },
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["dog", "cat", "bird", "fish", "horse", "other"]},
                    "count": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["kind", "count"],
            },
            "maxItems": 4,
        },
    },
    "required": ["name", "age", "occupation", "home", "pets"],
}
PEOPLE = [
    "Maria Silva is a 34-year-old teacher from Lisbon, Portugal. She has two cats.",
    "Kenji Watanabe, 51, works as a doctor in Osaka, Japan, and keeps a dog.",
    "Aisha Bello is a student aged 21 living in Lagos, Nigeria, with three fish.",
    "Tom Becker is an engineer from Munich, Germany. He is 45 and has no pets.",
    "Lucia Romano, a 29-year-old chef in Naples, Italy, owns one bird and one cat.",
    "Pedro Alves farms near Porto Alegre, Brazil. He is 62 and keeps four horses.",
    "Emma Jones is an artist, 38, from Cardiff, Wales, United Kingdom, with a dog.",
    "Rahul Mehta, aged 27, is an engineer in Pune, India. He has two fish.",
    "Olga Petrova is a 55-year-old doctor from Kazan, Russia who has a cat.",
    "Samuel Okafor teaches in Accra, Ghana. He is 40 and has two dogs.",
    "Ines Garcia, 19, is a student in Seville, Spain, and has one bird.",
    "Liam Murphy is a 33-year-old chef from Cork, Ireland. He keeps three cats.",
    "Mei Chen, 46, is an artist living in Taipei, Taiwan, with a dog and two fish.",
    "Jonas Berg is a farmer aged 58 from Uppsala, Sweden, who owns five horses.",
    "Fatima Zahra, a 31-year-old engineer in Casablanca, Morocco, has no pets.",
    "Noah Williams is a 24-year-old student in Austin, United States, with a cat.",
    "Sofia Novak, 42, works as a teacher in Brno, Czech Republic, and has a dog.",
    "Ahmed Hassan is a doctor, 37, from Cairo, Egypt. He keeps two birds.",
    "Chloe Martin, aged 26, is an artist from Lyon, France, with one cat.",
    "Diego Torres is a chef from Lima, Peru. He is 50 and has three dogs.",
    "Hana Kim, 35, is an engineer in Busan, South Korea, and keeps fish.",
    "Oliver Smith is a 67-year-old farmer from Ballarat, Australia, with two dogs.",
]
REVIEWS = {
    "I absolutely loved this movie, it was wonderful!": "positive",
    "This was the worst meal I have ever had. Terrible.": "negative",
    "Great product, works perfectly and arrived early. Very happy!": "positive",
    "Awful service, rude staff, I will never come back.": "negative",
}
SENTIMENTS = ["positive", "negative", "neutral"]
MAX_TOKENS = 400  # far above what a record takes: every output must end with its JSON
NUM_SAMPLED_EVERY = 3  # sampled extraction on every third person


@pytest.fixture(scope="module")
def llm():
    return LLM(enforce_eager=True, max_model_len=1024)


def _chat(text: str, instruction: str) -> list[dict]:
    return [{"role": "user", "content": f"{instruction}\n\n{text}"}]


def test_json_extraction_under_a_nested_schema_is_always_valid(llm):
    instruction = f"Extract the person described below as JSON matching this schema: {json.dumps(PERSON_SCHEMA)}"
    # Compact JSON: a third of the tokens of the model's indented JSON, on a CPU that matters.
    constraint = StructuredOutputsParams(json=PERSON_SCHEMA, disable_any_whitespace=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=constraint)
    outputs = llm.chat([_chat(person, instruction) for person in PEOPLE], params, use_tqdm=False)
    ages = []
    for person, output in zip(PEOPLE, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (person, completion.text)
        record = json.loads(completion.text)
        jsonschema.validate(record, PERSON_SCHEMA)
        ages.append(str(record["age"]) in person)
    assert sum(ages) >= len(PEOPLE) // 2, "the model read few ages right: is the prompt reaching it?"


def test_sampled_json_extraction_is_always_valid(llm):
    instruction = "Describe this person as JSON."
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(json=PERSON_SCHEMA, disable_any_whitespace=True))
    people = PEOPLE[::NUM_SAMPLED_EVERY]
    for output in llm.chat([_chat(person, instruction) for person in people], params, use_tqdm=False):
        jsonschema.validate(json.loads(output.outputs[0].text), PERSON_SCHEMA)


def test_classification_with_choices(llm):
    instruction = "Is the sentiment of this review positive, negative or neutral? Answer with one word."
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(choice=SENTIMENTS))
    outputs = llm.chat([_chat(review, instruction) for review in REVIEWS], params, use_tqdm=False)
    answers = [output.outputs[0].text for output in outputs]
    assert set(answers) <= set(SENTIMENTS)
    assert sum(answer == label for answer, label in zip(answers, REVIEWS.values())) >= 3, answers
