"""Generate the structured-output (event extraction) example dataset.

Free text in, one-line JSON out. Each record is a short informal note about an
event (email, chat message, reminder, calendar entry, casual text); the answer
is a compact JSON object with the keys, in this order:

    {"title": str, "date": "YYYY-MM-DD" | null, "time": "HH:MM" | null,
     "location": str | null, "attendees": [str, ...]}

Rules the data follows (so the JSON is always exactly derivable from the note):

- title: the event kind, capitalised ("Budget review", "Birthday dinner").
- date: always written with the year and either a month name or ISO form in
  the note, normalised to YYYY-MM-DD. No relative dates ("next Tuesday").
- time: normalised to 24-hour HH:MM ("3:30 PM" -> "15:30", "noon" -> "12:00",
  "half past nine in the morning" -> "09:30").
- location: the place name as written in the note, without the leading
  preposition or article ("in the Maple Room" -> "Maple Room").
- attendees: the named people, in the order they are mentioned. The writer
  ("I", "me", "we") and unnamed groups ("team", "all") are not attendees.
- A field that the note does not mention is null ([] for attendees).

The test set draws names and places from the full vocabularies while the
training set sees only about 80% of them, and no note text appears in both.

Deterministic: standard library only, fixed seed. Rerun to rebuild
train.jsonl (240 records) and test.jsonl (60 records) next to this file:

    python examples/extract/make_data.py
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

SEED = 20270303
N_TRAIN = 240
N_TEST = 60
P_MISSING = 0.15  # share of notes without a date (and, separately, time / location / attendees)
MIN_WORDS, MAX_WORDS = 12, 36  # note length in words; short notes keep training cheap

HERE = Path(__file__).resolve().parent

PREFIXES = [
    "Extract the event as JSON:",
    "Turn this into event JSON:",
    "Event JSON for this note:",
    "Convert this note to event JSON:",
    "Extract event details as JSON:",
]

EVENT_TITLES = [
    "Budget review", "Birthday dinner", "Team standup", "Project kickoff",
    "Quarterly planning", "Design review", "Sprint retrospective", "Client call",
    "Job interview", "Book club", "Yoga class", "Coffee catch-up",
    "Farewell lunch", "Board meeting", "Piano lesson", "Football practice",
    "Movie night", "Hiking trip", "Wedding rehearsal", "Parent-teacher meeting",
    "Product demo", "Marketing sync", "Hackathon", "Onboarding session",
    "Game night", "Study group", "Team brunch", "Team offsite", "Charity run",
    "Housewarming party", "Pub quiz", "Research seminar", "Performance review",
    "Vendor meeting", "Volunteer shift", "Choir rehearsal", "Tennis match",
    "Photography walk", "Strategy workshop", "Hiring committee", "Science fair",
    "Dinner party", "Running club", "Thesis defense", "Sales pitch",
    "Security training", "Garden cleanup", "Karaoke night",
]

NAMES = [
    "Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Isabel",
    "Jamal", "Kenji", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa",
    "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe", "Aisha",
    "Bruno", "Carmen", "Dmitri", "Emeka", "Fatima", "Gabriel", "Hana", "Ivan",
    "Julia", "Kofi", "Leila", "Mateo", "Nina", "Oscar", "Paula", "Rahul", "Sofia",
    "Tomas", "Ingrid", "Lucas", "Mei", "Noah", "Olga", "Pedro", "Rania", "Sven",
    "Tara", "Amir", "Beatriz", "Chen", "Diego", "Erin", "Felix",
]

# (location value, preposition, article) -> the note says "<prep> [<article>] <value>"
PLACES = [
    # rooms
    ("Room 204", "in", ""), ("Room 3B", "in", ""), ("Conference Room A", "in", ""),
    ("Maple Room", "in", "the"), ("Blue Room", "in", "the"), ("Meeting Room 5", "in", ""),
    ("Lab 2", "in", ""), ("Studio 9", "in", ""), ("Orchid Room", "in", "the"),
    # cafés and restaurants
    ("Café Lumen", "at", ""), ("Blue Door Café", "at", "the"), ("Bean Street Coffee", "at", ""),
    ("Luna Café", "at", ""), ("Trattoria Sole", "at", ""), ("Golden Lotus", "at", "the"),
    ("Corner Bakery", "at", "the"), ("Main Street Pub", "at", "the"),
    # venues
    ("Riverside Park", "at", ""), ("Community Center", "at", "the"), ("Harbor Gym", "at", ""),
    ("Elm Street Library", "at", ""), ("City Museum", "at", "the"),
    ("Oak Hill Trailhead", "at", "the"), ("Westside Tennis Club", "at", "the"),
    ("Grand Hotel", "at", "the"),
    # cities
    ("Lisbon", "in", ""), ("Oslo", "in", ""), ("Berlin", "in", ""), ("Toronto", "in", ""),
    ("Austin", "in", ""), ("Melbourne", "in", ""), ("Nairobi", "in", ""), ("Kyoto", "in", ""),
    ("Edinburgh", "in", ""), ("Porto", "in", ""), ("Seoul", "in", ""), ("Montreal", "in", ""),
    # online
    ("Zoom", "on", ""), ("Google Meet", "on", ""), ("Microsoft Teams", "on", ""),
    ("video call", "on", "a"),
]

CLOSINGS = [
    "See you there!", "Thanks!", "Let me know if you can't make it.", "Cheers.",
    "Don't be late!", "Looking forward to it.", "Thanks, everyone.", "Talk soon.",
]
# Short notes (calendar entries, notes with several fields missing) are padded with
# information-free sentences up to MIN_WORDS instead of being redrawn, so that every
# template and every missing-field pattern keeps its share of the data.
FILLERS = [
    "Let me know if anything changes.", "Please reply to confirm.", "Details to follow.",
    "Should be fun.", "Hope that works for everyone.", "More info soon.", "Please RSVP.",
    "Bring a friend if you like.", "Ping me with questions.",
]
P_CLOSING = 0.6  # otherwise the note ends without a sign-off (keeps examples short)

# Templates. {slot} is filled in; [A|B] is an optional segment: the first
# alternative whose slots are all known is used, otherwise nothing. Slots
# outside brackets must always be known (event forms, closing).
# Tag "formal" restricts to numeric times and the plainer date formats.
TEMPLATES = [
    # emails
    ("any", "Hi all, just a reminder that the {event} is[ on {date}| coming up][ at {time}][ {at_loc}].[ {people} will be joining us.] {closing}"),
    ("any", "Hello everyone,\nI've scheduled the {event}[ for {date}][ at {time}][ {at_loc}].[ Invited: {people}.]\n{closing}"),
    ("any", "[Dear {people}|Dear team],\nplease join me for the {event}[ on {date}][ at {time}][ {at_loc}]. {closing}"),
    ("any", "Subject: {Event}\n\nHi[ {people}| all], the {event} will take place[ on {date}][ at {time}][ {at_loc}]. {closing}"),
    ("any", "Hi,\nfollowing up on our chat: the {event} is confirmed[ for {date}][ at {time}][ {at_loc}].[ Attending: {people}.]\nBest regards"),
    ("any", "Good morning! I'd like to invite you to {a_event}[ on {date}][, starting at {time}][, {at_loc}].[ {people} will also attend.] {closing}"),
    ("any", "Team, the {event} is now[ on {date}| confirmed][ at {time}][ {at_loc}]. Please update your calendars.[ Attendees: {people}.]"),
    # chat messages
    ("any", "hey! {event}[ on {date}][ at {time}][ {at_loc}][ with {people}], you in?"),
    ("any", "[{people_me}|We] are doing {a_event}[ on {date}][ at {time}][ {at_loc}]. Want to come?"),
    ("any", "are we still on for the {event}[ {at_loc}][ on {date}][ at {time}]?[ {people} said yes.]"),
    ("any", "lol just remembered the {event} is[ on {date}| soon][ at {time}][ {at_loc}][, {people} coming too]"),
    ("any", "quick q: is the {event} still[ on {date}| happening][ at {time}][ {at_loc}]?[ {people_me} will be there.]"),
    ("any", "[{people} invited me to|I'm going to] the {event}[ {at_loc}][ on {date}][ at {time}]. {closing}"),
    ("any", "ok so {event}[ is on {date}][, {time}][, {at_loc}].[ I'm bringing {people}.]"),
    ("any", "Heads up: {a_event}[ {at_loc}][ at {time}][ on {date}].[ {people} confirmed.]"),
    ("any", "Update on the {event}:[ it's on {date}| no date yet][, at {time}][, {at_loc}].[ Coming: {people}.]"),
    # reminders
    ("any", "Reminder: {event}[ on {date}][ at {time}][ {at_loc}].[ With {people}.]"),
    ("any", "Don't forget the {event}[ {at_loc}][ on {date}][ at {time}][ with {people}]!"),
    ("any", "Note to self: {event}[ with {people}][ on {date}][ at {time}][ {at_loc}]."),
    ("any", "Remember to prepare for the {event}[, which is on {date}][ at {time}][ {at_loc}].[ {people} will be there too.]"),
    ("any", "Friendly reminder that {a_event} is planned[ for {date}][ at {time}][ {at_loc}].[ Expected: {people}.] {closing}"),
    ("any", "Set an alarm: {event}[ at {time}][ on {date}][ {at_loc}][, with {people}]."),
    ("any", "To do: get ready for the {event}[ on {date}][ at {time}][ {at_loc}].[ Attendees: {people}.]"),
    # calendar-ish notes
    ("formal", "Calendar entry: {Event}[; {date}][; {time}][; {loc}][; with {people}]"),
    ("formal", "Event: {Event}.[ Date: {date}.][ Time: {time}.][ Place: {loc}.][ Attendees: {people}.]"),
    ("formal", "{Event}[ - {date}][, {time}][ @ {loc}][ (with {people})]"),
    ("formal", "Calendar: {Event}[ on {date}][ from {time}][, {at_loc}].[ Guests: {people}.]"),
    ("formal", "New invite: {Event}.[ When: {date}.][ Starts: {time}.][ Where: {loc}.][ Who: {people}.]"),
    ("formal", "Agenda item - {Event}[, {date}][, {time}][, {loc}].[ Participants: {people}.]"),
    ("any", "Booking confirmed: {event}[ {at_loc}][ on {date}][ at {time}][ for {people}]."),
    # casual texts
    ("any", "Can't wait for the {event}[ on {date}][ at {time}][ {at_loc}]![ {people} will be there too.]"),
    ("any", "So excited, {a_event}[ {at_loc}][ on {date}][ at {time}][ with {people}]!"),
    ("any", "Mom says the {event} is[ on {date}| still happening][ at {time}][ {at_loc}].[ {people} will come.]"),
    ("any", "Let's do the {event}[ on {date}][ at {time}][ {at_loc}]![ {people} can make it.]"),
    ("any", "Just booked {a_event}[ for {date}][ at {time}][ {at_loc}][ with {people}]. {closing}"),
    ("any", "yo[ {people}], {event}[ {at_loc}][ at {time}][ on {date}]. {closing}"),
    ("any", "I signed us up for {a_event}[ on {date}][ at {time}][ {at_loc}].[ {people} too!]"),
    ("any", "[{people_me} will meet for|I'll be at] the {event}[ {at_loc}][ on {date}][ at {time}]."),
    ("any", "Planning {a_event}[ with {people}][ {at_loc}][ on {date}][ at {time}]. Does that work for you?"),
    ("any", "If anyone asks, the {event} is[ on {date}| not scheduled yet][ at {time}][ {at_loc}].[ Organisers: {people}.]"),
    ("any", "[At {time} there's|There's] {a_event}[ {at_loc}][ on {date}][ with {people}]. {closing}"),
    ("any", "[On {date} we|We] have the {event}[ at {time}][ {at_loc}].[ Joining: {people}.]"),
]

ALWAYS = {"event", "Event", "a_event", "closing"}
OPTIONAL = {"date", "time", "loc", "at_loc", "people", "people_me"}

MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["twelve", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine", "ten", "eleven"]

SEGMENT = re.compile(r"\[([^\[\]]*)\]")
SLOT = re.compile(r"\{(\w+)\}")


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def render_date(d: dt.date, style: str, rng: random.Random) -> str:
    """A date the note states unambiguously: always the year, and a month name or ISO."""
    m, wd = MONTHS[d.month - 1], WEEKDAYS[d.weekday()]
    forms = [
        f"{m} {d.day}, {d.year}",
        f"{d.day} {m} {d.year}",
        d.isoformat(),
        f"{wd}, {m} {d.day}, {d.year}",
        f"{wd} {d.day} {m} {d.year}",
    ]
    if style == "any":
        forms += [
            f"{MONTH_ABBR[d.month - 1]} {d.day}, {d.year}",
            f"{m} {ordinal(d.day)}, {d.year}",
            f"the {ordinal(d.day)} of {m} {d.year}",
        ]
    return rng.choice(forms)


def render_time(hour: int, minute: int, style: str, rng: random.Random) -> str:
    """A clock time whose 24-hour value is unambiguous."""
    h12 = hour % 12 or 12
    ampm = "am" if hour < 12 else "pm"
    hm = f"{h12}" if minute == 0 else f"{h12}:{minute:02d}"
    forms = [
        f"{hm}{ampm}", f"{hm} {ampm}", f"{hm} {ampm.upper()}",
        f"{hour:02d}:{minute:02d}", f"{hour:02d}:{minute:02d}",
    ]
    if style == "any":
        forms.append(f"{hm} {ampm[0]}.m.")
        period = "in the morning" if hour < 12 else "in the afternoon" if hour < 17 else "in the evening"
        if (hour, minute) == (12, 0):
            forms += ["noon", "noon", "midday"]
        elif minute == 0:
            forms += [f"{NUMBER_WORDS[h12 % 12]} {period}", f"{NUMBER_WORDS[h12 % 12]} o'clock {period}",
                      f"{h12} {period}"]
        elif minute == 30:
            forms += [f"half past {NUMBER_WORDS[h12 % 12]} {period}"] * 2
        elif minute == 15:
            forms.append(f"quarter past {NUMBER_WORDS[h12 % 12]} {period}")
        elif minute == 45 and hour not in (11, 12):
            forms.append(f"quarter to {NUMBER_WORDS[(h12 + 1) % 12]} {period}")
    return rng.choice(forms)


def render_people(people: list[str], rng: random.Random) -> str:
    if len(people) == 1:
        return people[0]
    if len(people) == 2:
        return f"{people[0]} and {people[1]}"
    comma = "," if rng.random() < 0.3 else ""
    return ", ".join(people[:-1]) + f"{comma} and {people[-1]}"


def fill(template: str, slots: dict) -> str:
    def segment(match: re.Match) -> str:
        for alt in match.group(1).split("|"):
            if all(slots.get(s) is not None for s in SLOT.findall(alt)):
                return alt
        return ""

    text = SEGMENT.sub(segment, template)
    return SLOT.sub(lambda m: slots[m.group(1)], text)


def check_templates() -> None:
    for _, t in TEMPLATES:
        outside = SLOT.findall(SEGMENT.sub("", t))
        assert set(outside) <= ALWAYS, (t, outside)
        used = set(SLOT.findall(t))
        # every optional field must be mentionable, otherwise the JSON would claim more than the note says
        assert {"date", "time"} <= used and used & {"loc", "at_loc"} and used & {"people", "people_me"}, t
        assert used <= ALWAYS | OPTIONAL, t
    assert len({t for _, t in TEMPLATES}) == len(TEMPLATES) >= 30


def sample_event(rng: random.Random, names: list[str], places: list[tuple], missing: set[str]) -> tuple[str, dict]:
    while True:
        style, template = rng.choice(TEMPLATES)
        title = rng.choice(EVENT_TITLES)
        phrase = title[0].lower() + title[1:]
        article = "an" if phrase[0] in "aeiou" else "a"

        date = None
        if "date" not in missing:
            date = dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))
        clock = None
        if "time" not in missing:
            clock = (rng.randint(7, 21), rng.choice([0, 0, 0, 0, 30, 30, 15, 45]))
        place = rng.choice(places) if "location" not in missing else None
        people: list[str] = []
        if "attendees" not in missing:
            k = rng.choices([1, 2, 3, 4], weights=[30, 30, 25, 15])[0]
            people = rng.sample(names, k)

        slots = {
            "event": phrase, "Event": title, "a_event": f"{article} {phrase}",
            "closing": rng.choice(CLOSINGS) if rng.random() < P_CLOSING else "",
            "date": render_date(date, style, rng) if date else None,
            "time": render_time(*clock, style, rng) if clock else None,
            "loc": place[0] if place else None,
            "at_loc": " ".join(w for w in (place[1], place[2], place[0]) if w) if place else None,
            "people": render_people(people, rng) if people else None,
            "people_me": render_people(people + ["I"], rng) if people else None,  # "Ana, Ben and I"
        }
        note = "\n".join(line.rstrip() for line in fill(template, slots).strip().split("\n"))
        note = note.replace("m..", "m.")  # "... at 5 p.m.." -> "... at 5 p.m."
        if len(note.split()) < MIN_WORDS:
            if note[-1] not in ".!?)":
                note += "."
            while len(note.split()) < MIN_WORDS:
                note += " " + rng.choice([f for f in FILLERS if f not in note])
        if not MIN_WORDS <= len(note.split()) <= MAX_WORDS:
            continue
        obj = {
            "title": title,
            "date": date.isoformat() if date else None,
            "time": f"{clock[0]:02d}:{clock[1]:02d}" if clock else None,
            "location": place[0] if place else None,
            "attendees": people,
        }
        verify(note, obj, slots)
        return note, obj


def verify(note: str, obj: dict, slots: dict) -> None:
    """The JSON must be readable off the note."""
    assert obj["title"].lower() in note.lower(), (note, obj)
    for key in ("date", "time", "loc"):
        if slots[key] is not None:
            assert slots[key] in note, (key, note)
    if obj["location"] is not None:
        assert obj["location"] in note
    positions = []
    for name in obj["attendees"]:
        hits = [m.start() for m in re.finditer(rf"\b{re.escape(name)}\b", note)]
        assert len(hits) == 1, (name, note)
        positions.append(hits[0])
    assert positions == sorted(positions), note
    # no stray names of people who are not attendees
    for name in NAMES:
        if name not in obj["attendees"]:
            assert not re.search(rf"\b{re.escape(name)}\b", note), (name, note)


def record(note: str, obj: dict, rng: random.Random) -> dict:
    return {"messages": [
        {"role": "user", "content": f"{rng.choice(PREFIXES)} {note}"},
        {"role": "assistant", "content": json.dumps(obj, ensure_ascii=False)},
    ]}


def build(rng: random.Random, n: int, names: list, places: list, seen: set[str]) -> list[dict]:
    # Each field is absent from exactly round(P_MISSING * n) notes of the split,
    # assigned independently per field, so absences also co-occur.
    k = round(P_MISSING * n)
    absent = {}
    for field in ("date", "time", "location", "attendees"):
        flags = [True] * k + [False] * (n - k)
        rng.shuffle(flags)
        absent[field] = flags
    rows = []
    while len(rows) < n:
        missing = {f for f, flags in absent.items() if flags[len(rows)]}
        note, obj = sample_event(rng, names, places, missing)
        if note in seen:
            continue
        seen.add(note)
        rows.append(record(note, obj, rng))
    return rows


def main() -> None:
    check_templates()
    rng = random.Random(SEED)
    # Test draws from the full vocabularies; train sees only ~80% of the names and
    # places, so part of the test set asks for names/places never seen in training.
    names = NAMES[:]
    places = PLACES[:]
    rng.shuffle(names)
    rng.shuffle(places)
    train_names, train_places = names[:48], places[: int(len(places) * 0.8)]

    seen: set[str] = set()
    train = build(rng, N_TRAIN, train_names, train_places, seen)
    test = build(rng, N_TEST, NAMES, PLACES, seen)

    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} records to {HERE / name}")


if __name__ == "__main__":
    main()
