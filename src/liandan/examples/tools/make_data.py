"""Generate the tool-calling example dataset.

Every record offers the same four tools (in a shuffled order), so the model has to choose:

    get_weather(city, unit?)               unit: celsius | fahrenheit; celsius when left out
    convert_units(value, from_unit, to_unit)   length, weight, volume, temperature
    create_event(title, date, time?)       date YYYY-MM-DD, time HH:MM (24-hour)
    get_time(city)

and the assistant either calls one or two of them or answers directly. Records use OpenAI's
fine-tuning format: ``{"tools": [...], "messages": [...]}``, an assistant call turn has
``"content": ""`` and ``tool_calls`` whose ``arguments`` is a JSON *string*, each result is a
``tool`` message naming its ``tool_call_id``.

Rules the data follows, so the one right call is readable off the user's words and an exact
comparison of arguments is fair:

- city: as the user writes it, capitalised, no country.
- unit (get_weather): only when the user names one ("in Fahrenheit", "°F" -> "fahrenheit").
- convert_units: the value as a number, the units by their canonical names ("km" -> "kilometers").
- title: quoted titles as written; otherwise the event phrase with its first letter capitalised
  ("schedule a dentist appointment" -> "Dentist appointment").
- date: always with the year, a month name or ISO form; time: only when given, as 24-hour HH:MM.
- no tool when none is needed: facts, arithmetic, greetings, and requests the tools cannot do
  (each answered in one or two short sentences).

train.jsonl (240): 55% call -> result -> short answer grounded in the result, 15% the call
only (the conversation ends with it), 5% two calls in one turn (full round trip), 25% no call.
test.jsonl (60): the prompt and the expected next assistant turn only, with
``"checks": {"tool_call": "exact"}``: 37 single calls, 3 double calls, 15 no-call questions and
5 conversations whose next turn is the answer to a tool result. A quarter of the cities, event
titles and templates is kept out of training and each test question draws one half the time
(32 of the 45 test records with calls hold one); no-call questions are all unseen, and no user
message appears in both files.

Deterministic: standard library only, fixed seed. Rerun to rebuild both files next to this one.
The script checks every record (the calls against the tools' JSON Schemas among others) before
writing, and again as read back from the files; on a problem it names the record and exits
non-zero, writing nothing if the first check failed:

    python examples/tools/make_data.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import sys
from pathlib import Path

SEED = 20260420
HERE = Path(__file__).resolve().parent
P_SYSTEM = 0.4  # share of records with a system prompt
P_HELD_OUT = 0.5  # chance that a test question draws a held-out city / title / template

TRAIN_MIX = {"round_trip": 132, "call_only": 36, "parallel": 12, "no_call": 60}
TEST_MIX = {"single_call": 37, "parallel_calls": 3, "no_call": 15, "final_answer": 5}
TOOL_WEIGHTS = {"get_weather": 0.3, "convert_units": 0.25, "create_event": 0.25, "get_time": 0.2}
NO_CALL_WEIGHTS = {"fact": 0.4, "arithmetic": 0.25, "chat": 0.15, "cannot": 0.2}

# ---------------------------------------------------------------------------------------------
# The tools

UNITS = ["kilometers", "miles", "meters", "feet", "centimeters", "inches", "kilograms", "pounds",
         "grams", "ounces", "liters", "gallons", "celsius", "fahrenheit"]  # fmt: skip


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    _tool("get_weather", "Get the current weather in a city.", {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit; celsius if not given"},
    }, ["city"]),
    _tool("convert_units", "Convert a quantity of length, weight, volume or temperature to another unit.", {
        "value": {"type": "number", "description": "The quantity to convert"},
        "from_unit": {"type": "string", "enum": UNITS},
        "to_unit": {"type": "string", "enum": UNITS},
    }, ["value", "from_unit", "to_unit"]),
    _tool("create_event", "Add an event to the user's calendar.", {
        "title": {"type": "string", "description": "Event title"},
        "date": {"type": "string", "description": "Date as YYYY-MM-DD"},
        "time": {"type": "string", "description": "Start time as HH:MM, 24-hour; leave out for an all-day event"},
    }, ["title", "date"]),
    _tool("get_time", "Get the current local time in a city.", {
        "city": {"type": "string", "description": "City name, e.g. Tokyo"},
    }, ["city"]),
]  # fmt: skip
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]

SYSTEMS = [
    "You are a helpful assistant with access to tools.",
    "You are a helpful assistant. Use a tool when it helps; otherwise answer directly.",
    "You can call functions. Only call one when the question needs it.",
    "You are a friendly assistant. Keep answers short.",
    "You are a helpful assistant with access to tools. Answer in one or two sentences.",
]

# ---------------------------------------------------------------------------------------------
# Values

# (city, IANA time zone, UTC offset in minutes at standard time, typical temperature in °C)
CITIES = [
    ("Paris", "Europe/Paris", 60, 12), ("Rome", "Europe/Rome", 60, 16), ("Berlin", "Europe/Berlin", 60, 10),
    ("Madrid", "Europe/Madrid", 60, 15), ("Amsterdam", "Europe/Amsterdam", 60, 10), ("Vienna", "Europe/Vienna", 60, 11),
    ("Stockholm", "Europe/Stockholm", 60, 7), ("Oslo", "Europe/Oslo", 60, 6), ("Warsaw", "Europe/Warsaw", 60, 8),
    ("Prague", "Europe/Prague", 60, 9), ("London", "Europe/London", 0, 11), ("Dublin", "Europe/Dublin", 0, 10),
    ("Lisbon", "Europe/Lisbon", 0, 17), ("Edinburgh", "Europe/London", 0, 9), ("Reykjavik", "Atlantic/Reykjavik", 0, 5),
    ("Athens", "Europe/Athens", 120, 18), ("Helsinki", "Europe/Helsinki", 120, 6), ("Cairo", "Africa/Cairo", 120, 22),
    ("Cape Town", "Africa/Johannesburg", 120, 17), ("Lagos", "Africa/Lagos", 60, 27), ("Istanbul", "Europe/Istanbul", 180, 15),
    ("Nairobi", "Africa/Nairobi", 180, 18), ("Dubai", "Asia/Dubai", 240, 28), ("Karachi", "Asia/Karachi", 300, 26),
    ("Mumbai", "Asia/Kolkata", 330, 27), ("Kathmandu", "Asia/Kathmandu", 345, 18), ("Bangkok", "Asia/Bangkok", 420, 29),
    ("Hanoi", "Asia/Bangkok", 420, 24), ("Jakarta", "Asia/Jakarta", 420, 28), ("Singapore", "Asia/Singapore", 480, 28),
    ("Hong Kong", "Asia/Hong_Kong", 480, 23), ("Beijing", "Asia/Shanghai", 480, 13), ("Manila", "Asia/Manila", 480, 28),
    ("Seoul", "Asia/Seoul", 540, 13), ("Tokyo", "Asia/Tokyo", 540, 16), ("Osaka", "Asia/Tokyo", 540, 17),
    ("Adelaide", "Australia/Adelaide", 570, 17), ("Sydney", "Australia/Sydney", 600, 18),
    ("Melbourne", "Australia/Melbourne", 600, 15), ("Auckland", "Pacific/Auckland", 720, 15),
    ("Honolulu", "Pacific/Honolulu", -600, 25), ("Los Angeles", "America/Los_Angeles", -480, 18),
    ("San Francisco", "America/Los_Angeles", -480, 14), ("Seattle", "America/Los_Angeles", -480, 11),
    ("Vancouver", "America/Vancouver", -480, 11), ("Denver", "America/Denver", -420, 10),
    ("Chicago", "America/Chicago", -360, 10), ("Mexico City", "America/Mexico_City", -360, 17),
    ("Toronto", "America/Toronto", -300, 9), ("New York", "America/New_York", -300, 13),
    ("Boston", "America/New_York", -300, 11), ("Miami", "America/New_York", -300, 25),
    ("Montreal", "America/Toronto", -300, 7), ("Lima", "America/Lima", -300, 19), ("Bogotá", "America/Bogota", -300, 14),
    ("Santiago", "America/Santiago", -240, 15), ("Buenos Aires", "America/Argentina/Buenos_Aires", -180, 18),
    ("São Paulo", "America/Sao_Paulo", -180, 19),
]  # fmt: skip

CONDITIONS = {"cold": ["snowy", "cloudy", "clear", "foggy", "sunny", "overcast"],
              "mild": ["sunny", "cloudy", "partly cloudy", "rainy", "windy", "foggy", "overcast", "clear"],
              "hot": ["sunny", "clear", "partly cloudy", "humid", "stormy"]}  # fmt: skip

# Unit name -> (singular word, plural word, how users write a quantity in it, how they name it as a target).
UNIT_WORDS = {
    "kilometers": ("kilometer", "kilometers", ["km", "kilometers", "kilometres"], ["kilometers", "km", "kilometres"]),
    "miles": ("mile", "miles", ["miles", "mi"], ["miles"]),
    "meters": ("meter", "meters", ["m", "meters", "metres"], ["meters", "metres"]),
    "feet": ("foot", "feet", ["feet", "ft"], ["feet"]),
    "centimeters": ("centimeter", "centimeters", ["cm", "centimeters", "centimetres"], ["centimeters", "cm"]),
    "inches": ("inch", "inches", ["inches"], ["inches"]),
    "kilograms": ("kilogram", "kilograms", ["kg", "kilograms", "kilos"], ["kilograms", "kg", "kilos"]),
    "pounds": ("pound", "pounds", ["pounds", "lbs", "lb"], ["pounds", "lbs"]),
    "grams": ("gram", "grams", ["g", "grams"], ["grams"]),
    "ounces": ("ounce", "ounces", ["ounces", "oz"], ["ounces"]),
    "liters": ("liter", "liters", ["liters", "litres", "L"], ["liters", "litres"]),
    "gallons": ("gallon", "gallons", ["gallons", "US gallons"], ["gallons"]),
    "celsius": ("°C", "°C", ["°C", "degrees Celsius", "Celsius"], ["Celsius", "degrees Celsius", "°C"]),
    "fahrenheit": ("°F", "°F", ["°F", "degrees Fahrenheit", "Fahrenheit"], ["Fahrenheit", "degrees Fahrenheit", "°F"]),
}
# Size of each unit in its dimension's base unit (meter, kilogram, liter), and value ranges to ask about.
FACTORS = {"kilometers": 1000, "miles": 1609.344, "meters": 1, "feet": 0.3048, "centimeters": 0.01, "inches": 0.0254,
           "kilograms": 1, "pounds": 0.45359237, "grams": 0.001, "ounces": 0.028349523125,
           "liters": 1, "gallons": 3.785411784}  # fmt: skip
RANGES = {"kilometers": (2, 500), "miles": (2, 300), "meters": (2, 3000), "feet": (2, 10000), "centimeters": (2, 250),
          "inches": (2, 100), "kilograms": (2, 150), "pounds": (2, 300), "grams": (5, 1000), "ounces": (2, 40),
          "liters": (2, 100), "gallons": (2, 30), "celsius": (-20, 45), "fahrenheit": (-4, 110)}  # fmt: skip
PAIRS = [("kilometers", "miles"), ("meters", "feet"), ("centimeters", "inches"), ("kilograms", "pounds"),
         ("grams", "ounces"), ("liters", "gallons"), ("celsius", "fahrenheit")]  # fmt: skip
PAIRS += [(b, a) for a, b in PAIRS]

# (title, article for "a/an <title in lower case>", "" when it reads without one)
TITLES = [
    ("Dentist appointment", "a"), ("Team meeting", "a"), ("Lunch with Sarah", ""), ("Yoga class", "a"),
    ("Doctor's appointment", "a"), ("Haircut", "a"), ("Parent-teacher meeting", "a"), ("Project review", "a"),
    ("Birthday party", "a"), ("Job interview", "a"), ("Book club meeting", "a"), ("Piano lesson", "a"),
    ("Gym session", "a"), ("Car service", "a"), ("Coffee with Tom", ""), ("Date night", "a"),
    ("Budget meeting", "a"), ("Vet appointment", "a"), ("Football practice", ""), ("Movie night", "a"),
    ("Dinner with Ana", ""), ("Study session", "a"), ("Team standup", "a"), ("Farewell party", "a"),
    ("Client call", "a"), ("Swimming lesson", "a"), ("Guitar lesson", "a"), ("Eye exam", "an"),
    ("Grocery shopping", ""), ("Quarterly review", "a"), ("Anniversary dinner", "an"), ("Family barbecue", "a"),
    ("Code review", "a"), ("Sprint planning", ""), ("Volunteer shift", "a"), ("Tennis match", "a"),
    ("Language class", "a"), ("Physiotherapy session", "a"), ("Board meeting", "a"), ("Wine tasting", "a"),
]  # fmt: skip

MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["twelve", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine", "ten", "eleven"]

# ---------------------------------------------------------------------------------------------
# User templates. {slot} is filled in; [A|B] is an optional segment: the first alternative whose
# slots are all known is used, otherwise nothing (the same notation as examples/extract).

WEATHER = [
    "What's the weather in {city}[ in {unit}]?",
    "How's the weather in {city} right now?[ Give me the temperature in {unit}.]",
    "weather in {city}[ in {unit}] pls",
    "Can you check the weather in {city} for me?[ Use {unit}.]",
    "What is the current weather in {city}[, in {unit}]?",
    "I'm heading to {city} later. What's the weather like there[ in {unit}]?",
    "Tell me the temperature in {city}[ in {unit}].",
    "[In {unit}, how|How] warm is it in {city} at the moment?",
    "Could you look up the current conditions in {city}?[ Temperatures in {unit}, please.]",
    "{city} weather[ in {unit}]?",
    "Good morning! What's it like outside in {city} today?[ I prefer {unit}.]",
    "What's the temperature in {city} right now[ in {unit}]?",
    "Hey, what's the weather doing in {city}?[ ({unit} please)]",
    "Weather report for {city}[ in {unit}], please.",
    "Could you tell me what the weather is like in {city}[ in {unit}]?",
    "Need the current weather for {city}[, {unit}].",
    "How hot is it in {city} today[ in {unit}]?",
    "Please get me the weather in {city}[, temperature in {unit}].",
    "Is it nice out in {city}? Check the weather[ in {unit}] for me.",
    "what's it like in {city} right now weather-wise[, in {unit}]?",
]
TIME = [
    "What time is it in {city}?",
    "What's the local time in {city} right now?",
    "Tell me the current time in {city}.",
    "time in {city}?",
    "I need to call a friend in {city}. What time is it there now?",
    "Could you check what time it is in {city}?",
    "Current time in {city}, please.",
    "How late is it in {city} at the moment?",
    "Do you know the time in {city} right now?",
    "Please look up the local time for {city}.",
    "What hour is it in {city} now?",
    "Hey, what's the time over in {city}?",
]
CONVERT = [
    "Convert {v_from} to {to}.",
    "How many {to} is {v_from}?",
    "What is {v_from} in {to}?",
    "{v_from} to {to}?",
    "Can you convert {v_from} into {to} for me?",
    "I have {v_from}. How much is that in {to}?",
    "Please change {v_from} to {to}.",
    "What's {v_from} in {to}, roughly?",
    "How much is {v_from} in {to}?",
    "Quick conversion: {v_from} -> {to}",
    "Could you tell me how many {to} are in {v_from}?",
    "Express {v_from} in {to}, please.",
    "convert {v_from} to {to} pls",
    "What does {v_from} come to in {to}?",
]
EVENT = [
    'Add "{Title}" to my calendar on {date}[ at {time}].',
    "Schedule {a_title} on {date}[ at {time}].",
    "Can you put {a_title} in my calendar for {date}[ at {time}]?",
    'Create an event called "{Title}" on {date}[ at {time}].',
    "Please create a calendar event: {Title}, {date}[, {time}].",
    "I have {a_title} on {date}[ at {time}]. Put it in my calendar, please.",
    "Book {a_title} in my calendar for {date}[ at {time}].",
    "new event: {Title} on {date}[ at {time}]",
    "Could you add {a_title}[ at {time}] on {date} to my calendar?",
    "[On {date} at {time}|On {date}] I've got {a_title}. Can you add it to my calendar?",
    'Set up an event titled "{Title}" for {date}[ at {time}].',
    "Put '{Title}' on my calendar: {date}[, {time}].",
    "Make a calendar entry for {a_title} on {date}[ starting at {time}].",
    "Add {a_title} to my calendar on {date}[ at {time}], thanks!",
]
# (kinds of the calls in the order the user asks for them, template)
PARALLEL = [
    ("weather2", "What's the weather in {city} and {city2}[ in {unit}]?"),
    ("weather2", "Compare the weather in {city} and {city2}[, in {unit}]."),
    ("weather2", "How's the weather in {city}? And in {city2}?[ Use {unit}.]"),
    ("weather2", "Check the weather for {city} and for {city2}[ in {unit}], please."),
    ("weather2", "I'm choosing between {city} and {city2} for a trip. What's the weather like in each[ in {unit}]?"),
    ("time2", "What time is it in {city} and in {city2}?"),
    ("time2", "Tell me the local time in {city} and {city2}."),
    ("time2", "What's the time in {city} right now, and in {city2}?"),
    ("time2", "Can you check the time in both {city} and {city2}?"),
    ("weather_time", "What's the weather in {city}[ in {unit}], and what time is it there?"),
    ("time_weather", "Tell me the local time and the weather in {city}[ in {unit}]."),
    ("time_weather", "I'm calling a friend in {city}. What time is it there, and what's the weather like[ in {unit}]?"),
]
UNIT_NAMES = {"celsius": ["Celsius", "°C", "degrees Celsius", "celsius"],
              "fahrenheit": ["Fahrenheit", "°F", "degrees Fahrenheit", "fahrenheit"]}  # fmt: skip
# Words that name a temperature unit: a question without one must get a call without "unit".
UNIT_MENTION = re.compile(r"celsius|fahrenheit|°[CF]", re.IGNORECASE)

# Final answers, grounded in the tool results.
ANSWER_WEATHER = ["It's {t} and {cond} in {city}.", "In {city} it's {cond} and {t} right now.",
                  "Right now {city} is {cond} at {t}.", "The weather in {city}: {cond}, {t}.",
                  "It's currently {t} in {city}, and {cond}."]  # fmt: skip
ANSWER_TIME = ["It's {time} in {city} right now.", "The local time in {city} is {time}.",
               "In {city} it's {time} at the moment.", "It's currently {time} in {city}."]  # fmt: skip
ANSWER_CONVERT = ["{v_from} is {about}{result}.", "That's {about}{result}.", "{v_from} comes to {about}{result}."]
ANSWER_EVENT = ['Done! "{title}" is in your calendar on {date}[ at {time}].',
                'I\'ve added "{title}" to your calendar for {date}[ at {time}].',
                'Your event "{title}" is set for {date}[ at {time}].']  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Questions that need no tool, with short correct answers.

# None of these asks what liandan's retention probes (examples/general/probes.jsonl) ask, so that
# training on them does not leak answers into the probes; the self-check compares the texts.
COUNTRIES = [("Kenya", "Nairobi"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
             ("South Korea", "Seoul"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Portugal", "Lisbon"),
             ("Greece", "Athens"), ("Peru", "Lima"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Turkey", "Ankara"),
             ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Austria", "Vienna"), ("Finland", "Helsinki"),
             ("Denmark", "Copenhagen"), ("Chile", "Santiago"), ("the Netherlands", "Amsterdam"), ("Hungary", "Budapest"),
             ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"),
             ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("New Zealand", "Wellington"), ("Colombia", "Bogotá"),
             ("Cuba", "Havana")]  # fmt: skip
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
                     "capital of {c}?"]  # fmt: skip
CAPITAL_ANSWERS = ["The capital of {c} is {cap}.", "{cap} is the capital of {c}."]
FACTS = [
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
    ("Who wrote Don Quixote?", "Miguel de Cervantes wrote Don Quixote."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("What do you call a shape with eight sides?", "A shape with eight sides is an octagon."),
    ("How many degrees are in a right angle?", "A right angle has 90 degrees."),
    ("How many degrees are in a full circle?", "A full circle has 360 degrees."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("At what temperature does water freeze in Fahrenheit?", "Water freezes at 32 °F."),
    ("What is the freezing point of water in Kelvin?", "Water freezes at about 273.15 K."),
    ("What's the difference between weather and climate?",
     "Weather is the conditions on a given day; climate is the usual weather of a place over many years."),
    ("Why do we have time zones?", "The Sun is overhead at different times in different places, so each region sets its clock."),
    ("What is a leap year?", "A leap year has 366 days: February gets a 29th day."),
    ("How many days does February have in a leap year?", "February has 29 days in a leap year."),
    ("How many months have 31 days?", "Seven months have 31 days."),
    ("What is the metric system?", "A decimal system of measurement based on meters, kilograms and liters."),
    ("How fast does light travel?", "Light travels at about 299,792 kilometers per second."),
    ("Which is heavier, a kilogram of feathers or a kilogram of iron?", "Neither: they both weigh one kilogram."),
    ("Is a tomato a fruit or a vegetable?", "Botanically, a tomato is a fruit."),
    ("How many letters are in the English alphabet?", "The English alphabet has 26 letters."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("How many planets are in our solar system?", "There are 8 planets in our solar system."),
    ("What is the hottest planet in our solar system?", "Venus is the hottest planet in our solar system."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong, in 1969."),
    ("In what year did World War II end?", "World War II ended in 1945."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
    ("Who is credited with inventing the telephone?", "Alexander Graham Bell is credited with inventing the telephone."),
    ("What does DNA stand for?", "DNA stands for deoxyribonucleic acid."),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe."),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na."),
    ("How many bones are in the adult human body?", "An adult human has 206 bones."),
    ("How many teeth does an adult usually have?", "An adult usually has 32 teeth."),
    ("Which ocean lies between Europe and North America?", "The Atlantic Ocean lies between Europe and North America."),
    ("What language is mainly spoken in Mexico?", "Spanish is the main language of Mexico."),
    ("How many players does a soccer team have on the field?", "A soccer team has 11 players on the field."),
    ("What is the main ingredient in guacamole?", "Avocado is the main ingredient in guacamole."),
    ("How many strings does a standard guitar have?", "A standard guitar has 6 strings."),
    ("How many keys does a standard piano have?", "A standard piano has 88 keys."),
    ("How many wheels does a tricycle have?", "A tricycle has 3 wheels."),
]
CHAT = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello there", "Hi! What can I do for you?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thanks!", "You're welcome!"),
    ("Thank you so much, that helps.", "Glad I could help!"),
    ("What can you do?", ("I can check the weather, convert units, add events to your calendar and tell you the time "
                          "in a city. I can also answer simple questions.")),
    ("How are you?", "I'm doing well, thanks! How can I help you?"),
    ("bye", "Goodbye! Have a great day."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("Can you help me with something?", "Of course! What do you need?"),
    ("hey", "Hey! How can I help?"),
    ("Good night!", "Good night! Sleep well."),
    ("Who are you?", "I'm an AI assistant. I can check the weather, convert units, add calendar events and tell the time."),
    ("That's all for now, thanks.", "You're welcome. Have a nice day!"),
]  # fmt: skip
CAN = "I can check the weather, convert units, create calendar events and tell the time in a city."
CANNOT = [
    ("Book a flight from London to Rome.", "Sorry, I can't book flights. " + CAN),
    ("Send an email to my boss saying I'll be late.", "Sorry, I can't send emails. " + CAN),
    ("Order a large pepperoni pizza for delivery.", "Sorry, I can't order food. " + CAN),
    ("Play some relaxing music.", "Sorry, I can't play music. " + CAN),
    ("Turn off the living room lights.", "Sorry, I can't control your lights. " + CAN),
    ("Convert 100 US dollars to euros.", "Sorry, I can't convert currencies: I have no exchange rates. " + CAN),
    ("Call my mom.", "Sorry, I can't make phone calls. " + CAN),
    ("Text Ana that I'm on my way.", "Sorry, I can't send messages. " + CAN),
    ("What's Apple's stock price right now?", "Sorry, I can't look up stock prices. " + CAN),
    ("Book a table for two at an Italian restaurant tonight.", "Sorry, I can't book restaurants. " + CAN),
    ("Delete the dentist appointment from my calendar.", "Sorry, I can only add events to your calendar, not delete them."),
    ("What's on my calendar tomorrow?", "Sorry, I can't read your calendar; I can only add events to it."),
    ("What will the weather be like in Paris next week?", "Sorry, I can only check the current weather, not forecasts."),
    ("Find me a hotel in Berlin.", "Sorry, I can't search for hotels. " + CAN),
    ("Remind me to water the plants.", ("I can't set reminders, but I can add an event to your calendar if you tell me "
                                        "the date.")),
    ("Wake me up at 7 tomorrow.", "Sorry, I can't set alarms. " + CAN),
    ("Set a timer for 10 minutes.", "Sorry, I can't set timers. " + CAN),
    ("Convert 50 euros to yen.", "Sorry, I can't convert currencies: I have no exchange rates. " + CAN),
    ("Cancel my meeting with the client.", "Sorry, I can only add events to your calendar, not cancel them."),
    ("Get me a taxi to the airport.", "Sorry, I can't book taxis. " + CAN),
]  # fmt: skip
ARITHMETIC = ["What is {a} {op} {b}?", "what's {a} {op} {b}", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?",
              "{a} {op} {b} = ?", "Quick math: {a} {op} {b}?"]  # fmt: skip
OPS = {"plus": ("+", lambda a, b: a + b), "minus": ("-", lambda a, b: a - b), "times": ("×", lambda a, b: a * b)}
OP_WORDS = {"plus": ["+", "plus"], "minus": ["-", "minus"], "times": ["*", "times", "x"]}
SPANS = [("minutes", "seconds", 60)]  # not hours or days: the probes ask how many minutes an hour has
SPAN_QUESTIONS = ["How many {small} are in {n} {big}?", "How many {small} is {n} {big}?"]

SEGMENT = re.compile(r"\[([^\[\]]*)\]")
SLOT = re.compile(r"\{(\w+)\}")


def fill(template: str, slots: dict) -> str:
    def segment(match: re.Match) -> str:
        for alt in match.group(1).split("|"):
            if all(slots.get(s) is not None for s in SLOT.findall(alt)):
                return alt
        return ""

    return SLOT.sub(lambda m: str(slots[m.group(1)]), SEGMENT.sub(segment, template))


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def render_date(d: dt.date, rng: random.Random) -> str:
    """A date the user states unambiguously: always the year, and a month name or ISO."""
    m, wd = MONTHS[d.month - 1], WEEKDAYS[d.weekday()]
    return rng.choice([d.isoformat(), d.isoformat(), f"{m} {d.day}, {d.year}", f"{d.day} {m} {d.year}",
                       f"{MONTH_ABBR[d.month - 1]} {d.day}, {d.year}", f"{m} {ordinal(d.day)}, {d.year}",
                       f"{wd}, {m} {d.day}, {d.year}", f"the {ordinal(d.day)} of {m} {d.year}"])  # fmt: skip


def render_time(hour: int, minute: int, rng: random.Random) -> str:
    """A clock time whose 24-hour value is unambiguous."""
    h12, ampm = hour % 12 or 12, "am" if hour < 12 else "pm"
    hm = f"{h12}" if minute == 0 else f"{h12}:{minute:02d}"
    forms = [f"{hm}{ampm}", f"{hm} {ampm}", f"{hm} {ampm.upper()}", f"{hour:02d}:{minute:02d}", f"{hour:02d}:{minute:02d}"]
    period = "in the morning" if hour < 12 else "in the afternoon" if hour < 17 else "in the evening"
    if (hour, minute) == (12, 0):
        forms += ["noon", "midday"]
    elif minute == 0:
        forms += [f"{NUMBER_WORDS[h12 % 12]} {period}", f"{h12} {period}"]
    elif minute == 30:
        forms += [f"half past {NUMBER_WORDS[h12 % 12]} {period}"]
    return rng.choice(forms)


def number(x: float) -> int | float:
    """Whole numbers as ints, so the JSON says 5 rather than 5.0."""
    return int(x) if float(x).is_integer() else x


def quantity(value: float, unit: str) -> str:
    singular, plural = UNIT_WORDS[unit][:2]
    return f"{value} {singular if value == 1 else plural}"


# ---------------------------------------------------------------------------------------------
# One question and its calls: {"user", "calls": [(name, args)], "results": [dict], "answer"}


class Pools:
    """What a split draws from: training sees part of each list, the test set all of it, with
    a held-out item chosen half the time so that part of the test is new to the model."""

    def __init__(self, rng: random.Random, test: bool):
        self.rng, self.test = rng, test
        self.fresh = False  # whether the current question drew anything held out

    def pick(self, seen: list, held_out: list):
        if self.test and held_out and self.rng.random() < P_HELD_OUT:
            self.fresh = True
            return self.rng.choice(held_out)
        return self.rng.choice(seen)


def split(items: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """(seen in training, held out): a shuffled copy cut at 1 - fraction."""
    items = items[:]
    rng.shuffle(items)
    cut = len(items) - round(fraction * len(items))
    return items[:cut], items[cut:]


def weather_result(rng: random.Random, unit: str, typical: int) -> dict:
    """Weather a city could have: within a few degrees of its typical temperature in the tropics,
    within ten elsewhere."""
    spread = 4 if typical >= 24 else 10
    celsius = typical + rng.randint(-spread, spread)
    condition = rng.choice(CONDITIONS["cold" if celsius <= 1 else "hot" if celsius >= 28 else "mild"])
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"temperature": temperature, "unit": unit, "condition": condition}


def degrees(result: dict) -> str:
    return f"{result['temperature']} {'°C' if result['unit'] == 'celsius' else '°F'}"


def ask_unit(rng: random.Random) -> str | None:
    return rng.choices([None, "celsius", "fahrenheit"], weights=[50, 20, 30])[0]


def weather_question(p: Pools, v: dict) -> dict:
    (city, _, _, typical), unit = p.pick(*v["cities"]), ask_unit(p.rng)
    user = fill(p.pick(*v["weather"]), {"city": city, "unit": p.rng.choice(UNIT_NAMES[unit]) if unit else None})
    args = {"city": city} | ({"unit": unit} if unit else {})
    result = weather_result(p.rng, unit or "celsius", typical)
    answer = p.rng.choice(ANSWER_WEATHER).format(t=degrees(result), cond=result["condition"], city=city)
    return {"user": user, "calls": [("get_weather", args)], "results": [result], "answer": answer}


def local_time(utc: dt.datetime, offset: int) -> str:
    return (utc + dt.timedelta(minutes=offset)).strftime("%H:%M")


def time_question(p: Pools, v: dict) -> dict:
    city, zone, offset, _ = p.pick(*v["cities"])
    utc = dt.datetime(2026, 1, 1) + dt.timedelta(minutes=p.rng.randrange(24 * 60))
    result = {"time": local_time(utc, offset), "timezone": zone}
    answer = p.rng.choice(ANSWER_TIME).format(time=result["time"], city=city)
    return {"user": fill(p.pick(*v["time"]), {"city": city}), "calls": [("get_time", {"city": city})],
            "results": [result], "answer": answer}  # fmt: skip


def convert(value: float, source: str, target: str) -> float:
    if source == "celsius":
        return value * 9 / 5 + 32
    if source == "fahrenheit":
        return (value - 32) * 5 / 9
    return value * FACTORS[source] / FACTORS[target]


def convert_question(p: Pools, v: dict) -> dict:
    source, target = p.rng.choice(PAIRS)
    low, high = RANGES[source]
    # a whole number, or one decimal place for quantities up to a few hundred
    value = number(p.rng.randint(low * 10, high * 10) / 10 if high <= 500 and p.rng.random() < 0.3 else p.rng.randint(low, high))
    v_from = f"{value} {p.rng.choice(UNIT_WORDS[source][2])}"
    user = fill(p.pick(*v["convert"]), {"v_from": v_from, "to": p.rng.choice(UNIT_WORDS[target][3])})
    exact = convert(value, source, target)
    result = number(round(exact, 2))
    about = "" if result == exact else "about "
    answer = p.rng.choice(ANSWER_CONVERT).format(v_from=quantity(value, source), about=about, result=quantity(result, target))
    args = {"value": value, "from_unit": source, "to_unit": target}
    return {"user": user, "calls": [("convert_units", args)], "results": [{"value": result, "unit": target}],
            "answer": answer[0].upper() + answer[1:]}  # fmt: skip


def event_question(p: Pools, v: dict) -> dict:
    title, article = p.pick(*v["titles"])
    phrase = title[0].lower() + title[1:]
    date = dt.date(2026, 1, 1) + dt.timedelta(days=p.rng.randrange(2 * 365))
    clock = (p.rng.randint(7, 21), p.rng.choice([0, 0, 0, 30, 30, 15, 45])) if p.rng.random() < 0.6 else None
    hhmm = f"{clock[0]:02d}:{clock[1]:02d}" if clock else None
    slots = {"Title": title, "a_title": f"{article} {phrase}".strip(), "date": render_date(date, p.rng),
             "time": render_time(*clock, p.rng) if clock else None}  # fmt: skip
    args = {"title": title, "date": date.isoformat()} | ({"time": hhmm} if clock else {})
    result = {"status": "created"} | args
    answer = fill(p.rng.choice(ANSWER_EVENT), {"title": title, "date": date.isoformat(), "time": hhmm})
    return {"user": fill(p.pick(*v["event"]), slots), "calls": [("create_event", args)], "results": [result],
            "answer": answer}  # fmt: skip


def parallel_question(p: Pools, v: dict, family: str) -> dict:
    """Two calls in one turn: the weather in two cities, the time in two, or both in one city."""
    kinds, template = p.pick(*v["parallel"][family])
    city, zone, offset, typical = p.pick(*v["cities"])
    city2, zone2, offset2, typical2 = city, zone, offset, typical
    while city2 == city:
        city2, zone2, offset2, typical2 = p.pick(*v["cities"])
    unit = ask_unit(p.rng) if "weather" in kinds else None
    user = fill(template, {"city": city, "city2": city2, "unit": p.rng.choice(UNIT_NAMES[unit]) if unit else None})
    utc = dt.datetime(2026, 1, 1) + dt.timedelta(minutes=p.rng.randrange(24 * 60))
    with_unit = {"unit": unit} if unit else {}
    if kinds == "weather2":
        w1, w2 = weather_result(p.rng, unit or "celsius", typical), weather_result(p.rng, unit or "celsius", typical2)
        answer = p.rng.choice(["In {c1} it's {t1} and {d1}; in {c2} it's {t2} and {d2}.", "{c1}: {t1}, {d1}. {c2}: {t2}, {d2}."])
        calls = [("get_weather", {"city": city} | with_unit), ("get_weather", {"city": city2} | with_unit)]
        answer = answer.format(c1=city, t1=degrees(w1), d1=w1["condition"], c2=city2, t2=degrees(w2), d2=w2["condition"])
        return {"user": user, "calls": calls, "results": [w1, w2], "answer": answer}
    if kinds == "time2":
        t1, t2 = {"time": local_time(utc, offset), "timezone": zone}, {"time": local_time(utc, offset2), "timezone": zone2}
        answer = p.rng.choice(["It's {h1} in {c1} and {h2} in {c2}.", "{c1}: {h1}. {c2}: {h2}."])
        return {"user": user, "calls": [("get_time", {"city": city}), ("get_time", {"city": city2})], "results": [t1, t2],
                "answer": answer.format(c1=city, h1=t1["time"], c2=city2, h2=t2["time"])}  # fmt: skip
    w, t = weather_result(p.rng, unit or "celsius", typical), {"time": local_time(utc, offset), "timezone": zone}
    calls = [("get_weather", {"city": city} | with_unit, w), ("get_time", {"city": city}, t)]
    if kinds == "time_weather":  # the calls in the order the user asks
        calls.reverse()
    answer = p.rng.choice(["In {c} it's {h}, {t} and {d}.", "It's {h} in {c}, and the weather is {d} at {t}."])
    return {"user": user, "calls": [(n, a) for n, a, _ in calls], "results": [r for _, _, r in calls],
            "answer": answer.format(c=city, h=t["time"], t=degrees(w), d=w["condition"])}  # fmt: skip


def no_call_question(p: Pools, v: dict, kind: str) -> dict:
    """A question answered directly. Each item is used once across both files."""
    rng = p.rng
    if kind == "arithmetic":
        if rng.random() < 0.25:
            big, small, per = rng.choice(SPANS)
            n = rng.randint(2, 12)
            return {"user": rng.choice(SPAN_QUESTIONS).format(small=small, n=n, big=big),
                    "answer": f"{n} {big} is {n * per} {small}."}  # fmt: skip
        op = rng.choice(list(OPS))
        # ranges the probes' sums and products (7 + 5, 6 times 7, 25 + 17, ...) stay out of
        a, b = (rng.randint(11, 19), rng.randint(3, 9)) if op == "times" else (rng.randint(31, 99), rng.randint(12, 49))
        if op == "minus" and b > a:
            a, b = b, a
        symbol, compute = OPS[op]
        user = rng.choice(ARITHMETIC).format(a=a, op=rng.choice(OP_WORDS[op]), b=b)
        return {"user": user, "answer": f"{a} {symbol} {b} = {compute(a, b)}."}
    question, answer = v[kind][1 if p.test else 0].pop()  # each used once: the lists are split between the files
    return {"user": question, "answer": answer}


def no_call_pool(rng: random.Random) -> list[tuple[str, str]]:
    capitals = [(rng.choice(CAPITAL_QUESTIONS).format(c=c), rng.choice(CAPITAL_ANSWERS).format(c=c, cap=cap))
                for c, cap in COUNTRIES]  # fmt: skip
    for i, (q, a) in enumerate(capitals):  # "The capital of the Netherlands" but "The Netherlands" first in a sentence
        capitals[i] = (q, a[0].upper() + a[1:])
    return capitals + FACTS


def verify(q: dict) -> None:
    """The calls must be readable off the user's words, and the answer off the results."""
    user = q["user"]
    for name, args in q.get("calls", []):
        if "city" in args:
            assert args["city"] in user, (args, user)
        if name == "get_weather":
            assert ("unit" in args) == bool(UNIT_MENTION.search(user)), (args, user)
            assert "unit" not in args or args["unit"] in user.lower() or f"°{args['unit'][0].upper()}" in user, (args, user)
        if name == "convert_units":
            assert f"{args['value']} " in user, (args, user)
        if name == "create_event":
            title = args["title"]
            assert title in user or title[0].lower() + title[1:] in user, (args, user)
    for result in q.get("results", []):
        shown = [degrees(result), result["condition"]] if "condition" in result else []
        shown += [result["time"]] if "time" in result and "status" not in result else []
        shown += [result["title"], result["date"]] if "status" in result else []
        shown += [quantity(result["value"], result["unit"])] if "value" in result else []
        assert shown and all(s in q["answer"] for s in shown), (result, q["answer"])


def vocabularies(rng: random.Random) -> dict:
    """(seen in training, held out) for each list the questions draw from; about a quarter of the
    cities, titles and templates is held out."""
    v = {"cities": split(CITIES, 0.25, rng), "titles": split(TITLES, 0.25, rng), "weather": split(WEATHER, 0.25, rng),
         "time": split(TIME, 0.25, rng), "convert": split(CONVERT, 0.25, rng), "event": split(EVENT, 0.25, rng)}  # fmt: skip
    families = {"weather2": [], "time2": [], "mixed": []}
    for kinds, template in PARALLEL:
        families[kinds if kinds in families else "mixed"].append((kinds, template))
    v["parallel"] = {family: split(items, 0.25, rng) for family, items in families.items()}
    # Facts, chat and cannot-do requests: disjoint between the files, about 80% in training.
    for kind, items in (("fact", no_call_pool(rng)), ("chat", CHAT), ("cannot", CANNOT)):
        v[kind] = split(items, 0.2, rng)
    return v


def quotas(weights: dict, n: int, rng: random.Random) -> list[str]:
    """n keys in the proportions of weights (largest remainder), in a shuffled order."""
    exact = {k: w * n / sum(weights.values()) for k, w in weights.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    keys = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(keys)
    return keys


QUESTIONS = {"get_weather": weather_question, "convert_units": convert_question, "create_event": event_question,
             "get_time": time_question}  # fmt: skip


def call_turn(calls: list[tuple[str, dict]]) -> dict:
    tool_calls = [{"id": f"call_{i}", "type": "function",
                   "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                  for i, (name, args) in enumerate(calls, 1)]  # fmt: skip
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}


def result_turns(calls: list[tuple[str, dict]], results: list[dict]) -> list[dict]:
    return [{"role": "tool", "tool_call_id": f"call_{i}", "name": name, "content": json.dumps(result, ensure_ascii=False)}
            for i, ((name, _), result) in enumerate(zip(calls, results), 1)]  # fmt: skip


def conversation(q: dict, kind: str, rng: random.Random) -> list[dict]:
    """The messages of one record of this kind: the prompt, then what the kind keeps of the exchange."""
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < P_SYSTEM else []
    messages.append({"role": "user", "content": q["user"]})
    if kind in ("no_call",):
        return messages + [{"role": "assistant", "content": q["answer"]}]
    if kind in ("call_only", "single_call", "parallel_calls"):
        return messages + [call_turn(q["calls"])]
    answer = {"role": "assistant", "content": q["answer"]}
    return messages + [call_turn(q["calls"]), *result_turns(q["calls"], q["results"]), answer]


def plan(mix: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(record kind, what it asks: a tool, a pair of calls or a kind of no-call question) for each
    record, in exact proportions, shuffled."""
    subkinds = {"round_trip": TOOL_WEIGHTS, "call_only": TOOL_WEIGHTS, "single_call": TOOL_WEIGHTS,
                "parallel": {"weather2": 5, "time2": 4, "mixed": 3}, "parallel_calls": {"weather2": 1, "time2": 1, "mixed": 1},
                "no_call": NO_CALL_WEIGHTS, "final_answer": {**{t: 1 for t in TOOL_WEIGHTS}, "weather2": 1}}  # fmt: skip
    rows = [(kind, sub) for kind, n in mix.items() for sub in quotas(subkinds[kind], n, rng)]
    rng.shuffle(rows)
    return rows


def question(sub: str, p: Pools, v: dict) -> dict:
    if sub in QUESTIONS:
        return QUESTIONS[sub](p, v)
    if sub in NO_CALL_WEIGHTS:
        return no_call_question(p, v, sub)
    return parallel_question(p, v, sub)


def build(mix: dict, test: bool, rng: random.Random, v: dict, seen: set[str]) -> tuple[list[dict], int]:
    """The records of one file, and how many of them drew something held out."""
    p, rows, fresh = Pools(rng, test), [], 0
    for n, (kind, sub) in enumerate(plan(mix, rng), 1):
        while True:
            p.fresh = False
            q = question(sub, p, v)
            if q["user"] not in seen:
                break
        seen.add(q["user"])
        verify(q)
        record = {"tools": rng.sample(TOOLS, len(TOOLS)), "messages": conversation(q, kind, rng)}
        if test:
            fresh += p.fresh
            record = {"id": f"tools-{n:03d}", "category": kind, **record, "checks": {"tool_call": "exact"}}
        rows.append(record)
    return rows, fresh


# ---------------------------------------------------------------------------------------------
# The self-check: every record as a reader of the files would check it.

TYPES = {"object": dict, "string": str, "number": (int, float), "integer": int, "boolean": bool, "array": list}
CLOCK = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def schema_problems(value, schema: dict, where: str) -> list[str]:
    """The subset of JSON Schema the tools use: type, enum, properties, required, additionalProperties."""
    kind = schema.get("type")
    if kind and (not isinstance(value, TYPES[kind]) or (isinstance(value, bool) and kind != "boolean")):
        return [f"{where}: expected {kind}, got {json.dumps(value, ensure_ascii=False)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: expected one of {schema['enum']}, got {value!r}"]
    problems = []
    if kind == "object":
        properties = schema.get("properties", {})
        problems += [f"{where}: missing required key {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            problems += [f"{where}: unexpected key {k!r}" for k in value if k not in properties]
        for key, sub in properties.items():
            if key in value:
                problems += schema_problems(value[key], sub, f"{where}.{key}")
    return problems


def argument_problems(name: str, arguments: str, schema: dict, where: str) -> list[str]:
    try:
        args = json.loads(arguments)
    except (TypeError, json.JSONDecodeError) as exc:
        return [f"{where}.arguments: expected a JSON string, got {arguments!r} ({exc})"]
    problems = schema_problems(args, schema, f"{where}.arguments")
    try:
        import jsonschema  # a second opinion where it is installed (liandan's test extra has it)
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        errors = jsonschema.Draft202012Validator(schema).iter_errors(args)
        problems += [f"{where}.arguments: jsonschema: {e.message}" for e in errors]
    if name == "create_event" and isinstance(args, dict):
        try:
            ok = len(args.get("date", "")) == 10 and dt.date.fromisoformat(args["date"])
        except (TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(f"{where}.arguments.date: expected a real date as YYYY-MM-DD, got {args.get('date')!r}")
        if "time" in args and not (isinstance(args["time"], str) and CLOCK.fullmatch(args["time"])):
            problems.append(f"{where}.arguments.time: expected HH:MM (24-hour), got {args['time']!r}")
    return problems


def call_problems(message: dict, tools: dict, ids: set[str], where: str) -> list[str]:
    problems = [] if message.get("content") == "" else [f"{where}.content: expected \"\" beside tool_calls"]
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not calls:
        return problems + [f"{where}.tool_calls: expected a non-empty list"]
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type") != "function":
            problems.append(f"{at}: expected {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
            continue
        if not isinstance(call.get("id"), str) or call["id"] in ids:
            problems.append(f"{at}.id: expected an id not used before in this record, got {call.get('id')!r}")
        ids.add(call.get("id"))
        if function.get("name") not in tools:
            problems.append(f"{at}.function.name: {function.get('name')!r} is not one of this record's tools {sorted(tools)}")
            continue
        problems += argument_problems(function["name"], function.get("arguments"), tools[function["name"]], at)
    return problems


def message_problems(messages: list, tools: dict, where: str) -> list[str]:
    """[system], user, then assistant turns; a call turn either ends the conversation or is followed
    by one result per call, in the calls' order, and then an assistant turn."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return [f"{where}.messages: expected a non-empty list of messages"]
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    if roles[start : start + 1] != ["user"] or roles[-1] != "assistant":
        return [f"{where}.messages: expected [system,] user, ..., assistant; got roles {roles}"]
    problems, ids, i = [], set(), start + 1
    while i < len(messages):
        at, message = f"{where}.messages[{i}]", messages[i]
        if message.get("role") != "assistant":
            return problems + [f"{at}.role: expected assistant, got {message.get('role')!r}"]
        if not message.get("tool_calls"):
            if not isinstance(message.get("content"), str) or not message["content"].strip() or i != len(messages) - 1:
                problems.append(f"{at}: expected a non-empty answer that ends the conversation")
            return problems
        problems += call_problems(message, tools, ids, at)
        if i == len(messages) - 1:
            return problems
        for j, call in enumerate(message["tool_calls"]):
            i += 1
            result = messages[i] if i < len(messages) - 1 else {}
            expected = {"role": "tool", "tool_call_id": call.get("id"), "name": call.get("function", {}).get("name")}
            if {k: result.get(k) for k in expected} != expected:
                return problems + [f"{where}.messages[{i}]: expected the result of call {j} ({expected}), then an assistant turn"]
            try:
                json.loads(result.get("content"))
            except (TypeError, json.JSONDecodeError):
                problems.append(f"{where}.messages[{i}].content: expected JSON as a string")
        i += 1
    return problems


def kind_of(record: dict) -> str:
    """What a record holds, read off its messages."""
    messages = record["messages"]
    calls = sum(len(m.get("tool_calls") or []) for m in messages)
    if calls == 0:
        return "no_call"
    if messages[-1].get("tool_calls"):
        return "parallel_calls" if calls > 1 else ("single_call" if "checks" in record else "call_only")
    if "checks" in record:
        return "final_answer"
    return "parallel" if calls > 1 else "round_trip"


def record_problems(record, where: str, test: bool) -> list[str]:
    keys = ["id", "category", "tools", "messages", "checks"] if test else ["tools", "messages"]
    if not isinstance(record, dict) or sorted(record) != sorted(keys):
        return [f"{where}: expected an object with the keys {keys}"]
    tools = record["tools"]
    names = [t.get("function", {}).get("name") for t in tools] if isinstance(tools, list) else []
    if sorted(names) != sorted(TOOL_NAMES) or any(t not in TOOLS for t in tools):
        return [f"{where}.tools: expected the four tools {TOOL_NAMES}, each defined as in make_data.TOOLS"]
    problems = message_problems(record["messages"], {t["function"]["name"]: t["function"]["parameters"] for t in tools}, where)
    if test and not problems:
        if record["checks"] != {"tool_call": "exact"}:
            problems.append(f"{where}.checks: expected {{'tool_call': 'exact'}}")
        if record["category"] != kind_of(record):
            problems.append(f"{where}.category: {record['category']!r}, but the messages hold a {kind_of(record)} record")
    return problems


def check(files: dict[str, list[dict]]) -> list[str]:
    problems = []
    for name, rows in files.items():
        for n, record in enumerate(rows, 1):
            problems += record_problems(record, f"{name}:{n}", name.startswith("test"))
    users = {name: [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"] for name, rows in files.items()}
    shared = set(users["train.jsonl"]) & set(users["test.jsonl"])
    problems += [f"test.jsonl: the user message {u!r} is in train.jsonl too" for u in sorted(shared)]
    probes = HERE.parent / "general" / "probes.jsonl"
    if probes.is_file():
        asked = {normal(json.loads(line)["prompt"]) for line in probes.read_text(encoding="utf-8").splitlines() if line.strip()}
        problems += [f"{name}: the user message {u!r} is a retention probe in {probes.name}"
                     for name, texts in users.items() for u in texts if normal(u) in asked]  # fmt: skip
    for name, mix in (("train.jsonl", TRAIN_MIX), ("test.jsonl", TEST_MIX)):
        counts = {k: sum(kind_of(r) == k for r in files[name]) for k in mix}
        if counts != mix:
            problems.append(f"{name}: expected the records {mix}, got {counts}")
    for schema in (t["function"]["parameters"] for t in TOOLS):
        try:
            import jsonschema
        except ImportError:
            break
        jsonschema.Draft202012Validator.check_schema(schema)
    return problems


def normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def write(path: Path, rows: list[dict]) -> None:
    """Through a temporary file, so a failed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


def main() -> int:
    rng = random.Random(SEED)
    v = vocabularies(rng)
    seen: set[str] = set()
    train, _ = build(TRAIN_MIX, False, rng, v, seen)
    test, fresh = build(TEST_MIX, True, rng, v, seen)
    problems = check({"train.jsonl": train, "test.jsonl": test})
    if not problems:
        for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
            write(HERE / name, rows)
        # Read back what was written: every line must parse to the record that passed.
        read = {name: [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]
                for name in ("train.jsonl", "test.jsonl")}  # fmt: skip
        problems = check(read)
    if problems:
        print("\n".join(problems[:50]), file=sys.stderr)
        print(f"{len(problems)} problems; fix make_data.py", file=sys.stderr)
        return 1
    with_calls = TEST_MIX["single_call"] + TEST_MIX["parallel_calls"] + TEST_MIX["final_answer"]
    print(f"wrote {len(train)} records to {HERE / 'train.jsonl'}: {TRAIN_MIX}")
    print(f"wrote {len(test)} records to {HERE / 'test.jsonl'}: {TEST_MIX}; "
          f"{fresh} of the {with_calls} with calls draw a held-out city, title or template")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
