"""A synthetic, seeded environment shaped like LoCoMo: multi-session chats between two people, then questions.

Each task is one conversation of `num_sessions` sessions, days to weeks apart, rendered as `locomo.render_stream`
renders the real ones: one turn per chunk, a session's first turn prefixed by ``DATE: 1:56 pm on 8 May, 2023``.
Each speaker has `facts_per_speaker` relations, told in the first person and answered by the other speaker (a
reaction, often a follow-up question and its answer), between greetings, small talk and goodbyes:

- home: the city they live in, and maybe a later move ("I moved to Porto two days ago");
- job: what they work as, and maybe a later new job ("Last Monday was my first day as a pilot");
- pet: a pet adopted on a told day ("I adopted a parrot yesterday and named it Mango"), maybe a second one later;
- trip: a trip planned for next month, later changed to another city or done;
- hobby: one or two hobbies taken up, sometimes with the day of the first lesson;
- event: a one-off thing done on a told day ("I ran a charity 5K last Saturday").

Questions come in LoCoMo's five categories, with its integer codes, and are scored by its official metric:

- 4 single-hop: one fact in one turn; for a value that changed, the latest ("Where does Maya live now?");
- 1 multi-hop: the values of one relation across sessions, comma-separated as the official F1 expects ("Which cities
  has Maya lived in?" -> "Lisbon, Porto");
- 2 temporal: the day of a told event, worked out from the session date and the relative phrase ("7 May 2023"),
  or the month of a planned trip ("June 2023");
- 3 open-domain: an inference the generator can check: the country of a city told, the field of a job told;
- 5 adversarial: a question about the other speaker's fact ("What is the name of Leo's dog?" when only Maya has a
  dog); gold "Not mentioned in the conversation", offered with the tempting wrong answer as two options.

Values (over 150 names, 100 cities with their countries, 60 jobs with their fields, 12 species by 100 pet names, 40
hobbies, 40 events) and phrasings (at least four templates per statement, three per question) are drawn per
conversation, so nothing can be learned by template; small talk draws its cities, pets, jobs and hobbies from what the
conversation's facts do not use, so it never contradicts an answer. A value that changes keeps its earlier statement in
the stream. The defaults (5 sessions of 16 turns, 4 of the six relations per speaker) give streams of 1.2K-1.6K
tokens (SmolLM2's tokenizer), 80-90 turns, and 14-31 questions each (on average 3 multi-hop, 7 temporal, 4
open-domain, 7 single-hop, 3 adversarial); `questions_per_task` samples fewer.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass, field
from typing import Any

from tmem_rl.envs import article, pick_unused, register_env
from tmem_rl.envs.base import Environment, Question, Task
from tmem_rl.envs.locomo import (
    NOT_MENTIONED,
    adversarial_options,
    locomo_answer_prompt,
    locomo_score,
    locomo_summary,
)
from tmem_rl.errors import InputError
from tmem_rl.metrics.locomo import CATEGORY_NAMES
from tmem_rl.records import QAPair

# ---- value pools ---------------------------------------------------------------------------------------------------

NAMES = (
    "Maya", "Leo", "Omar", "Lena", "Tariq", "Jonas", "Priya", "Mateo", "Aisha", "Felix", "Hana", "Diego", "Ingrid",
    "Kofi", "Elena", "Ravi", "Chloe", "Nikolai", "Yuki", "Samuel", "Amara", "Lucas", "Freya", "Hugo", "Zara", "Tomas",
    "Leila", "Bruno", "Nadia", "Oscar", "Mira", "Idris", "Clara", "Emil", "Rosa", "Kenji", "Talia", "Victor", "Noor",
    "Anton", "Beatriz", "Caleb", "Dalia", "Elias", "Fatima", "Gabriel", "Helena", "Ivan", "Jasmine", "Karim", "Lucia",
    "Marcus", "Nina", "Olga", "Pablo", "Quentin", "Rania", "Stefan", "Tessa", "Umar", "Vera", "Wendell", "Ximena",
    "Yara", "Zoltan", "Adele", "Bastian", "Celine", "Dmitri", "Esther", "Farid", "Greta", "Hamid", "Irene", "Javier",
    "Katya", "Lorenzo", "Magnus", "Nadine", "Orla", "Pedro", "Rafael", "Selma", "Theo", "Ulla", "Valentin",
    "Wilhelmina", "Yusuf", "Zainab", "Alma", "Boris", "Carmen", "Dario", "Elif", "Florian", "Gloria", "Henrik", "Ines",
    "Jakob", "Kaveh", "Liesel", "Milan", "Nora", "Otto", "Paloma", "Rashid", "Saoirse", "Tobias", "Uma", "Vivian",
    "Wanda", "Xavier", "Yasmin", "Zeno", "Anika", "Bilal", "Cosima", "Desmond", "Eitan", "Fiona", "Gideon", "Hiroshi",
    "Isla", "Jamal", "Kira", "Lars", "Malika", "Nils", "Ophelia", "Pavel", "Rhea", "Soren", "Tamsin", "Ugo",
    "Violeta", "Wesley", "Yosef", "Zelda", "Arjun", "Brigitte", "Cyrus", "Dorothea", "Emeka", "Franka", "Gustav",
    "Hedda", "Imran", "Josefine", "Kwame", "Linnea", "Mehmet", "Nikita", "Odette", "Piers", "Renata", "Sanjay",
    "Thalia", "Ulrich", "Vesna", "Winston", "Yvette", "Zubair", "Agnes", "Benedikt", "Constance", "Darius",
)
CITIES = {  # city -> its country (the open-domain answer); no city shares a name with a country, person or word
    "Lisbon": "Portugal", "Porto": "Portugal", "Coimbra": "Portugal", "Toronto": "Canada", "Montreal": "Canada",
    "Vancouver": "Canada", "Halifax": "Canada", "Osaka": "Japan", "Kyoto": "Japan", "Sapporo": "Japan",
    "Nairobi": "Kenya", "Mombasa": "Kenya", "Krakow": "Poland", "Gdansk": "Poland", "Wroclaw": "Poland",
    "Melbourne": "Australia", "Brisbane": "Australia", "Hobart": "Australia", "Valencia": "Spain", "Seville": "Spain",
    "Bilbao": "Spain", "Granada": "Spain", "Seoul": "South Korea", "Busan": "South Korea", "Dublin": "Ireland",
    "Galway": "Ireland", "Cork": "Ireland", "Lima": "Peru", "Cusco": "Peru", "Arequipa": "Peru", "Hamburg": "Germany",
    "Munich": "Germany", "Leipzig": "Germany", "Marseille": "France", "Lyon": "France", "Bordeaux": "France",
    "Strasbourg": "France", "Bangalore": "India", "Jaipur": "India", "Pune": "India", "Cape Town": "South Africa",
    "Durban": "South Africa", "Oslo": "Norway", "Bergen": "Norway", "Tromso": "Norway", "Santiago": "Chile",
    "Valparaiso": "Chile", "Reykjavik": "Iceland", "Akureyri": "Iceland", "Hanoi": "Vietnam", "Da Nang": "Vietnam",
    "Bologna": "Italy", "Naples": "Italy", "Turin": "Italy", "Copenhagen": "Denmark", "Aarhus": "Denmark",
    "Auckland": "New Zealand", "Wellington": "New Zealand", "Christchurch": "New Zealand", "Istanbul": "Turkey",
    "Izmir": "Turkey", "Buenos Aires": "Argentina", "Cordoba": "Argentina", "Mendoza": "Argentina",
    "Helsinki": "Finland", "Tampere": "Finland", "Zurich": "Switzerland", "Geneva": "Switzerland", "Accra": "Ghana",
    "Kumasi": "Ghana", "Vienna": "Austria", "Salzburg": "Austria", "Innsbruck": "Austria", "Manila": "Philippines",
    "Cebu": "Philippines", "Stockholm": "Sweden", "Gothenburg": "Sweden", "Rotterdam": "Netherlands",
    "Utrecht": "Netherlands", "Antwerp": "Belgium", "Ghent": "Belgium", "Budapest": "Hungary", "Athens": "Greece",
    "Thessaloniki": "Greece", "Marrakesh": "Morocco", "Casablanca": "Morocco", "Cairo": "Egypt", "Lagos": "Nigeria",
    "Bogota": "Colombia", "Medellin": "Colombia", "Quito": "Ecuador", "Montevideo": "Uruguay",
    "Guadalajara": "Mexico", "Monterrey": "Mexico", "Recife": "Brazil", "Curitiba": "Brazil",
    "Chiang Mai": "Thailand", "Bangkok": "Thailand", "Taipei": "Taiwan", "Kaohsiung": "Taiwan",
    "Ljubljana": "Slovenia", "Zagreb": "Croatia", "Dubrovnik": "Croatia", "Tallinn": "Estonia", "Riga": "Latvia",
    "Vilnius": "Lithuania", "Bucharest": "Romania", "Plovdiv": "Bulgaria", "Belgrade": "Serbia",
    "Kathmandu": "Nepal", "Colombo": "Sri Lanka", "Kigali": "Rwanda", "Dakar": "Senegal", "Tunis": "Tunisia",
    "Amman": "Jordan",
}
JOBS = {  # job -> its field (the open-domain answer)
    "nurse": "healthcare", "pharmacist": "healthcare", "dentist": "healthcare", "paramedic": "healthcare",
    "physiotherapist": "healthcare", "midwife": "healthcare", "optician": "healthcare", "radiographer": "healthcare",
    "veterinarian": "animal care", "zookeeper": "animal care", "dog groomer": "animal care",
    "software engineer": "technology", "data analyst": "technology", "web developer": "technology",
    "network administrator": "technology", "accountant": "finance", "bank teller": "finance",
    "financial advisor": "finance", "actuary": "finance", "tax consultant": "finance", "lawyer": "law",
    "paralegal": "law", "court reporter": "law", "notary": "law", "primary school teacher": "education",
    "university lecturer": "education", "teaching assistant": "education", "school librarian": "education",
    "architect": "construction", "electrician": "construction", "plumber": "construction", "carpenter": "construction",
    "bricklayer": "construction", "civil engineer": "construction", "pilot": "transportation",
    "bus driver": "transportation", "train conductor": "transportation", "ship captain": "transportation",
    "air traffic controller": "transportation", "geologist": "science", "chemist": "science",
    "marine biologist": "science", "lab technician": "science", "astronomer": "science", "meteorologist": "science",
    "journalist": "media", "radio host": "media", "film editor": "media", "podcast producer": "media",
    "pastry chef": "hospitality", "barista": "hospitality", "hotel receptionist": "hospitality",
    "sommelier": "hospitality", "event planner": "hospitality", "firefighter": "public safety",
    "police officer": "public safety", "lifeguard": "public safety", "florist": "retail", "bookseller": "retail",
    "shop manager": "retail", "graphic designer": "arts", "illustrator": "arts", "museum curator": "arts",
    "glassblower": "arts", "animator": "arts", "farmer": "agriculture", "winemaker": "agriculture",
    "beekeeper": "agriculture",
}
SPECIES = (
    "dog", "cat", "rabbit", "parrot", "hamster", "tortoise", "ferret", "guinea pig", "cockatiel", "hedgehog",
    "bearded dragon", "chinchilla",
)
PET_NAMES = (
    "Biscuit", "Pepper", "Mango", "Waffles", "Ziggy", "Noodle", "Juniper", "Pickles", "Clementine", "Bandit",
    "Marble", "Toffee", "Pretzel", "Cosmo", "Olive", "Rusty", "Sprout", "Nugget", "Luna", "Gizmo", "Maple",
    "Dumpling", "Pixel", "Basil", "Fig", "Comet", "Truffle", "Sable", "Button", "Crumpet", "Hazel", "Socks",
    "Bramble", "Kiwi", "Tofu", "Ember", "Churro", "Mochi", "Peanut", "Snickers", "Oreo", "Muffin", "Cinnamon",
    "Nacho", "Pumpkin", "Sushi", "Taco", "Bagel", "Jellybean", "Marshmallow", "Brownie", "Popcorn", "Chickpea",
    "Lentil", "Acorn", "Pebble", "Clover", "Thistle", "Birch", "Cedar", "Aspen", "Sequoia", "Rocket", "Blaze",
    "Smokey", "Misty", "Zephyr", "Nimbus", "Orbit", "Nova", "Quasar", "Pluto", "Jupiter", "Saturn", "Apollo",
    "Zeus", "Odin", "Thor", "Loki", "Yoda", "Chewie", "Gandalf", "Frodo", "Bilbo", "Sherlock", "Watson", "Poirot",
    "Bowie", "Elvis", "Banjo", "Kazoo", "Tuba", "Bongo", "Domino", "Yahtzee", "Pixie", "Sprocket", "Widget",
    "Gadget", "Doodle", "Scribble", "Squiggle", "Wobble", "Dolly", "Fudge", "Sprinkles", "Ravioli", "Gnocchi",
    "Wasabi", "Paprika", "Saffron", "Nutmeg", "Custard", "Teacup",
)
HOBBIES = (
    "pottery", "rock climbing", "salsa dancing", "watercolor painting", "chess", "birdwatching", "knitting",
    "surfing", "photography", "sourdough baking", "archery", "calligraphy", "woodworking", "kayaking", "fencing",
    "origami", "ice skating", "tap dancing", "rowing", "sailing", "figure drawing", "candle making",
    "jewelry making", "embroidery", "bouldering", "mountain biking", "scuba diving", "ballroom dancing",
    "improv comedy", "screen printing", "bookbinding", "trail running", "drumming", "gardening", "yoga", "pilates",
    "tai chi", "judo", "skateboarding", "crochet",
)
EVENTS = (  # (past tense, as the speaker tells it; base form, as a question asks it)
    ("ran a charity 5K", "run a charity 5K"), ("went to a jazz concert", "go to a jazz concert"),
    ("volunteered at an animal shelter", "volunteer at an animal shelter"),
    ("went to a cousin's wedding", "go to a cousin's wedding"), ("visited a planetarium", "visit a planetarium"),
    ("gave a talk at a local school", "give a talk at a local school"),
    ("went to a farmers market", "go to a farmers market"), ("ran a half marathon", "run a half marathon"),
    ("went camping by a lake", "go camping by a lake"), ("attended a poetry reading", "attend a poetry reading"),
    ("went to an art gallery opening", "go to an art gallery opening"),
    ("helped a friend move house", "help a friend move house"),
    ("went on a wine tasting tour", "go on a wine tasting tour"), ("donated blood", "donate blood"),
    ("went to a comedy show", "go to a comedy show"), ("watched a meteor shower", "watch a meteor shower"),
    ("went to a job fair", "go to a job fair"), ("joined a beach cleanup", "join a beach cleanup"),
    ("went to a film festival", "go to a film festival"),
    ("went to a friend's baby shower", "go to a friend's baby shower"),
    ("planted a vegetable garden", "plant a vegetable garden"), ("went to a book signing", "go to a book signing"),
    ("competed in a trivia night", "compete in a trivia night"), ("went to a karaoke night", "go to a karaoke night"),
    ("took a hot air balloon ride", "take a hot air balloon ride"),
    ("went to a science museum", "go to a science museum"), ("went to a pride parade", "go to a pride parade"),
    ("ran a bake sale for charity", "run a bake sale for charity"), ("went whale watching", "go whale watching"),
    ("went to a high school reunion", "go to a high school reunion"),
    ("toured a chocolate factory", "tour a chocolate factory"), ("went to a silent disco", "go to a silent disco"),
    ("volunteered at a food bank", "volunteer at a food bank"), ("went to a music festival", "go to a music festival"),
    ("went to a basketball game", "go to a basketball game"), ("tried an escape room", "try an escape room"),
    ("watched a ballet performance", "watch a ballet performance"),
    ("went to a cooking competition", "go to a cooking competition"),
    ("spent a day at a theme park", "spend a day at a theme park"),
    ("went to a lantern festival", "go to a lantern festival"),
)
FOODS = ("curry", "dumplings", "risotto", "tacos", "ramen", "lentil soup", "paella", "flatbread", "stir fry",
         "pancakes", "lasagna", "falafel")
SHOWS = ("Night Harbour", "The Long Orchard", "Glass Houses", "Signal Lost", "Paper Moons", "Northern Static",
         "Quiet Engines", "The Salt Road")

# Relative days: (phrase, days before the session date). "last <weekday>" is added for 2-6 days before.
DAYS_BEFORE = (
    ("this morning", 0), ("earlier today", 0), ("yesterday", 1), ("the day before yesterday", 2),
    ("two days ago", 2), ("three days ago", 3), ("four days ago", 4), ("five days ago", 5), ("a week ago", 7),
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# ---- templates -----------------------------------------------------------------------------------------------------
# Statements are the subject's own turn. {when}/{When}: a relative day; {a}: the job's article; {old}: the value before.

STATEMENTS = {
    "home": (
        "I've been living in {city} for a few years now, and it still surprises me.",
        "Life in {city} has been pretty good to me lately.",
        "My apartment in {city} is tiny, but I love the view.",
        "You know how it is here in {city}, there's always something going on.",
        "Honestly, {city} has really grown on me since I settled here.",
    ),
    "move": (
        "Big news: I moved to {city} {when}!",
        "{When} I finally finished moving to {city}.",
        "I packed up everything and moved from {old} to {city} {when}.",
        "So I left {old} behind {when}. I live in {city} now!",
        "The movers dropped the last boxes at my new place in {city} {when}.",
    ),
    "job": (
        "I work as {a} {job}, so my days are pretty full.",
        "Being {a} {job} is tiring, but I love it.",
        "Work has been hectic. That's life as {a} {job}, I guess.",
        "My job as {a} {job} keeps me on my toes.",
        "I've been {a} {job} for a while now and I still enjoy it.",
    ),
    "new_job": (
        "I started a new job as {a} {job} {when}!",
        "{When} was my first day as {a} {job}.",
        "I stopped being {old_a} {old} and started as {a} {job} {when}.",
        "Guess who's {a} {job} now? I started {when}.",
        "{When} I signed the contract and started working as {a} {job}.",
    ),
    "pet": (
        "I adopted a {species} {when}! I named it {name}.",
        "{When} I brought home a little {species} called {name}.",
        "Meet {name}! It's the {species} I adopted {when}.",
        "I finally did it: {when} I adopted a {species} and named it {name}.",
        "{When} I went to the shelter and came back with a {species}. Its name is {name}.",
        "{When} I got a {species} from a rescue. Say hi to {name}!",
    ),
    "trip": (
        "I'm planning a trip to {city} next month!",
        "Next month I'm finally going to {city}. I've booked the flights.",
        "I just booked a trip to {city} for next month.",
        "I'm heading to {city} next month, I can't wait!",
        "Guess what: I'm going to {city} next month for a whole week.",
    ),
    "trip_changed": (
        "Change of plans: I'm going to {city} instead of {old}.",
        "I cancelled {old}. I'm going to {city} instead, same dates.",
        "So {old} fell through, and now the trip is to {city}.",
        "Small update on my trip: I swapped {old} for {city}.",
    ),
    "trip_done": (
        "I just got back from {city}! What a trip.",
        "My trip to {city} was everything I hoped for.",
        "I'm back from {city} and already missing it.",
        "The trip to {city} was amazing, I took so many photos.",
    ),
    "hobby": (
        "I've gotten really into {hobby} lately.",
        "My new obsession is {hobby}. I can't stop.",
        "I took up {hobby} a little while ago and I'm hooked.",
        "These days I spend every free evening on {hobby}.",
        "I finally started {hobby}, something I've wanted to try for years.",
    ),
    "hobby_lesson": (
        "I went to my first {hobby} lesson {when}!",
        "{When} I had my very first {hobby} lesson.",
        "I signed up for {hobby} lessons and the first one was {when}.",
        "{When} I tried my first {hobby} lesson and loved it.",
    ),
    "event": (
        "{When} I {past}, and it was so much fun!",
        "Guess what? I {past} {when}!",
        "I {past} {when}. Still buzzing from it.",
        "So {when} I {past}. Totally worth it.",
        "Big news from my side: I {past} {when}.",
    ),
}
# The other speaker's reply to a statement, and the subject's answer when the reply asks something (None: no answer).
# Replies never repeat the value, so a value is said only by the person it belongs to.
REACTIONS = {
    "home": (
        ("That sounds like a great place to live. Do you like your neighborhood?",
         "Mostly! The neighbors are friendly and there's a market around the corner."),
        ("Oh nice, I've heard the food scene there is great.", None),
        ("How's the rent there? I hear it's gone up everywhere.", "Don't get me started. It's a lot, but worth it."),
        ("Lucky you! Is it easy to get around without a car?", "Pretty easy, I mostly walk or take the tram."),
    ),
    "move": (
        ("Wow, that's a big change! How are you finding it?",
         "Still getting used to it, but I already like the coffee shops."),
        ("Congrats on the move! Did you unpack yet?", "Half of it. The kitchen is still a maze of boxes."),
        ("No way! That was fast. Do you know anyone there?", "A couple of people, and I'm meeting more every week."),
        ("That's so exciting. New place, new start!", None),
    ),
    "job": (
        ("That sounds demanding. What's the best part of it?", "The people I work with, honestly."),
        ("I always admired people who do that. Long hours?", "Sometimes, but the good days make up for it."),
        ("Respect! I could never do that job.", None),
        ("Do you see yourself doing it for a long time?", "For now, yes. I'm still learning a lot."),
    ),
    "new_job": (
        ("Congratulations! How was the first week?", "Exhausting, but everyone has been really welcoming."),
        ("That's huge! What made you switch?", "I needed a change, and the timing felt right."),
        ("Wow, good for you! We have to celebrate.", None),
        ("Amazing news! Are you nervous?", "A little, but mostly excited."),
    ),
    "pet": (
        ("Aww, a {species}! How is it settling in?", "Really well. It already has a favorite spot by the window."),
        ("That's adorable! Send me pictures!", None),
        ("Oh wow, congratulations! Pets make everything better.", "They really do. The place feels livelier."),
        ("That's such a cute name! What made you choose it?", "It just felt right the moment we met."),
    ),
    "trip": (
        ("Oh, that's exciting! What are you most looking forward to?",
         "Honestly, just wandering around and eating everything."),
        ("Jealous! Are you going alone?", "With a friend from work. It should be fun."),
        ("You deserve a break. Have a great time!", None),
        ("Nice! Have you made an itinerary yet?", "Not really, I like to figure it out as I go."),
    ),
    "trip_changed": (
        ("Oh, what happened?", "The flights got too expensive, so I looked for something else."),
        ("Plans change! That still sounds like a great trip.", None),
        ("Interesting switch. Are you happy with it?", "Yes, maybe even happier than before."),
        ("Ha, that's a twist. Was it a hard choice?", "Not really, it was a quick decision."),
    ),
    "trip_done": (
        ("Welcome back! What was the highlight?", "A long walk on the last evening, hard to beat."),
        ("So glad it went well! You look rested.", None),
        ("I want to see all the photos!", "I'll send you the best ones tonight."),
        ("Was it hard to come back to normal life?", "Very. I'm already planning the next one."),
    ),
    "hobby": (
        ("That's so cool! How did you get into it?", "A friend dragged me along once and I never stopped."),
        ("I love that you're trying new things.", None),
        ("Is it hard to learn?", "Harder than it looks, but that's part of the fun."),
        ("You'll have to show me sometime!", "Deal, next time you visit."),
    ),
    "event": (
        ("That sounds amazing! How was it?", "It was great, I'd happily do it again."),
        ("Oh fun! Who did you go with?", "A couple of old friends. We had a blast."),
        ("Wow, I'm so glad you had a good time.", None),
        ("That's awesome! Would you do it again?", "In a heartbeat."),
    ),
}
REACTIONS["hobby_lesson"] = REACTIONS["hobby"]
QUESTIONS = {
    "home": ("Where does {p} live now?", "Which city does {p} live in now?",
             "What city is {p} living in at the moment?"),
    "homes": ("Which cities has {p} lived in?", "What cities has {p} called home?",
              "In which cities has {p} lived so far?"),
    "home_country": ("In which country does {p} live now?", "Which country is {p} living in now?",
                     "What country is {p}'s current home in?"),
    "move_date": ("When did {p} move to {city}?", "On what date did {p} move to {city}?",
                  "When did {p} finish moving to {city}?"),
    "job": ("What does {p} do for work now?", "What is {p}'s job now?", "What does {p} currently do for a living?"),
    "jobs": ("What jobs has {p} had?", "Which jobs has {p} worked?", "What has {p} worked as?"),
    "job_field": ("In what field does {p} work now?", "Which field is {p}'s current job in?",
                  "What industry does {p} work in now?"),
    "job_date": ("When did {p} start working as {a} {job}?", "When was {p}'s first day as {a} {job}?",
                 "On what date did {p} start the job as {a} {job}?"),
    "pet": ("What is the name of {p}'s {species}?", "What did {p} name the {species}?",
            "What is {p}'s {species} called?"),
    "pets": ("What are the names of {p}'s pets?", "What are {p}'s pets called?", "What names do {p}'s pets have?"),
    "pet_date": ("When did {p} adopt {name}?", "When did {p} bring {name} home?",
                 "On what date did {p} get the {species} named {name}?"),
    "trip": ("What is the destination of {p}'s trip?", "Where is {p}'s trip to?",
             "Which city did {p} pick for the trip?"),
    "trips": ("Which destinations did {p} consider for the trip?", "What places has {p} planned to travel to?",
              "Which cities were in {p}'s travel plans?"),
    "trip_country": ("Which country is {p}'s trip to?", "In which country is {p}'s trip destination?",
                     "What country did {p} plan to visit?"),
    "trip_date": ("When is {p}'s trip planned for?", "In which month did {p} plan to travel?",
                  "When was {p} planning to take the trip?"),
    "hobby": ("What hobby has {p} taken up?", "What new hobby did {p} mention?", "Which hobby is {p} into lately?"),
    "hobbies": ("What hobbies has {p} taken up?", "Which hobbies is {p} into?", "What activities has {p} picked up?"),
    "lesson_date": ("When did {p} go to a first {hobby} lesson?", "When did {p} start {hobby} lessons?",
                    "On what date did {p} have a first {hobby} lesson?"),
    "event_date": ("When did {p} {base}?", "On what date did {p} {base}?", "When was it that {p} {past}?"),
}

# Small talk: a remark and a reply that fits it. {o}: the person spoken to; {city}, {pet}, {job}, {hobby}: values no
# fact of the conversation uses. It is never about the speaker's own home, job, pet, trip or hobby, so it asserts
# nothing a question asks.
SMALL_TALK = (
    (("The weather has been so strange lately.", "Traffic on the bridge was terrible today.",
      "The bus was late again this morning, of course.", "My phone battery dies by lunchtime these days.",
      "The power went out twice during the storm.", "I keep forgetting to water my plants.",
      "My neighbors are renovating again, it's so noisy.", "I've been sleeping so badly this week.",
      "I made {food} for dinner and it was a disaster.", "My laptop decided to update right before a call.",
      "I can't believe how expensive coffee has gotten.", "It rained so hard on {day} that the streets flooded.",
      "My neighbor's dog {pet} barked all night again.", "Someone left a bicycle chained to my fence."),
     ("Oh no, that's so annoying!", "Ugh, I feel that.", "Tell me about it.", "That sounds rough.",
      "Same here, honestly.", "Oof, I hope it gets better soon.", "That would drive me crazy.")),
    (("I finally fixed the leaky tap in the kitchen.", "I spent a whole afternoon reorganizing my bookshelf.",
      "I tried a new recipe for {food}, it was surprisingly good.", "The market had the best strawberries today.",
      "I finally cleaned out my closet. So many old clothes!", "I found an old photo album at my parents' place.",
      "I read {n} pages of my book on the train.", "I met a puppy called {pet} on my walk and it followed me.",
      "I've been trying to cook more {food} at home.", "I really need a long nap this weekend, and I'm taking it."),
     ("Sounds fun!", "Ha, nice!", "That's great!", "Wow, good for you.", "Love that.", "Small wins count!",
      "That made me smile.")),
    (("My cousin keeps sending me photos from {city}.",
      "A friend of mine just got back from {city} and won't stop talking about it.",
      "I watched a documentary about {city} and now everyone at work wants to go.",
      "My brother says he wants to become {job_a} {job}.", "My aunt has worked as {job_a} {job} for twenty years.",
      "A coworker of mine is trying {hobby} and won't talk about anything else.",
      "My sister keeps asking me to try {hobby} with her.", "There were {n} people in the queue at the post office.",
      "Everyone at the cafe was talking about {show}."),
     ("Ha, that sounds about right.", "That's wild!", "No way! Really?", "Hmm, interesting.", "Ha! Good to know.",
      "Funny how that goes.", "I can picture it.")),
    (("{o}, did you catch the game last night?", "Did you see the score last night, {o}?"),
     ("No, I missed it. I heard it was a close one.", "Only the second half, what a finish.",
      "Yes! I was yelling at the screen.")),
    (("Have you seen the new season of {show}?", "{o}, are you watching {show}?"),
     ("Not yet, but it's on my list!", "Yes! The ending was unbelievable.", "I gave up after two episodes.")),
    (("{o}, do you have any good book recommendations?", "Read anything good lately, {o}?"),
     ("I just finished a great mystery novel, I'll lend it to you.",
      "Not really, I've been stuck on the same book for months.", "Anything by the author we talked about.")),
    (("Do you ever feel like the weeks go by way too fast?", "Is it just me, or is this month flying by?"),
     ("All the time. It's already the middle of the month!", "Constantly, it's a little scary.",
      "Not just you. Where did the time go?")),
)
GREETINGS_FIRST = (
    ("Hi {o}! So nice to finally have a proper chat.", "Hey {s}! I know, it's been ages."),
    ("Hey {o}! How's it going?", "Hi {s}! Pretty good, thanks. Busy as always."),
    ("Hello {o}! Do you have a minute to catch up?", "Of course, {s}! I was hoping you'd message."),
    ("Hey {o}, good to see you!", "Good to see you too, {s}!"),
)
GREETINGS_LATER = (
    ("Hey {o}! Long time no talk. How have you been?", "Hi {s}! Good, good. So much has happened."),
    ("Hi {o}! It's been a few weeks, right?", "Hey {s}! Yes, way too long."),
    ("{o}! I was just thinking about you.", "Ha, {s}, perfect timing."),
    ("Hey {o}, are you free to chat for a bit?", "Always, {s}! Let's catch up."),
    ("Good to hear from you again, {o}!", "You too, {s}! It's been a while."),
)
BRIDGES = (  # the other speaker turns the talk to the subject
    "So what's new on your side, {o}?", "Any news from you, {o}?", "How have things been with you, {o}?",
    "Tell me, {o}, what have you been up to?", "What's going on in your life these days, {o}?",
)
BRIDGES_AGAIN = (  # ... who has just told something
    "Anything else new, {o}?", "What else has been going on, {o}?", "Any other news?", "What else is new?",
)
FAREWELLS = (
    ("I should get going, {o}. Talk soon!", "Bye, {s}! Take care."),
    ("Anyway, I have to run. Catch you later, {o}!", "See you, {s}!"),
    ("It was so good to catch up, {o}.", "Same here, {s}. Let's not wait so long next time!"),
    ("Okay, dinner is calling. Bye, {o}!", "Enjoy, {s}! Talk soon."),
)

RELATIONS = ("home", "job", "pet", "trip", "hobby", "event")


# ---- generation ------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity
class _Statement:
    """One fact told in the subject's own turn."""

    subject: str
    relation: str
    session: int
    text: str
    values: tuple[str, ...]  # the fact values the turn states
    pairs: list[tuple[str, str, bool]]  # (question, answer, whether the answer is the session date, not the turn)
    kind: str = ""  # key of STATEMENTS and REACTIONS
    follows: "_Statement | None" = None  # an earlier statement of the same story, told before this one
    species: str = ""  # a pet's
    chunk: int = -1  # set when rendered


@dataclass
class _Asked:
    category: int
    question: str
    gold: str
    evidence: list[_Statement]
    subject: str
    relation: str
    tempting: str | None = None  # category 5: the wrong answer offered
    when: str | None = None  # category 2: the relative phrase the gold is worked out from


@dataclass
class _Conversation:
    speakers: tuple[str, str]
    dates: list[datetime.datetime]
    statements: list[_Statement] = field(default_factory=list)
    asked: list[_Asked] = field(default_factory=list)
    used: dict[str, set] = field(default_factory=lambda: {k: set() for k in ("city", "job", "pet", "hobby", "species",
                                                                            "event")})
    """Values the facts took, per pool: no two facts share one, and small talk takes none."""


def session_date(when: datetime.datetime) -> str:
    """LoCoMo's session timestamp: "1:56 pm on 8 May, 2023"."""
    hour = when.hour % 12 or 12
    return f"{hour}:{when.minute:02d} {'am' if when.hour < 12 else 'pm'} on {_day(when)}"


def _day(when: datetime.date) -> str:
    return f"{when.day} {MONTHS[when.month - 1]}, {when.year}"


def gold_day(when: datetime.date) -> str:
    """A temporal gold as LoCoMo writes it: "7 May 2023"."""
    return f"{when.day} {MONTHS[when.month - 1]} {when.year}"


def _next_month(when: datetime.date) -> datetime.date:
    return datetime.date(when.year + when.month // 12, when.month % 12 + 1, 1)


def _dated_pairs(question: str, date: datetime.datetime) -> list[tuple[str, str, bool]]:
    """The reference pair of a dated statement: its question answered with the session's date, the nearest day the
    text states (on the session's DATE line; the turn's relative phrase, "yesterday", would score nothing as an
    answer, and the worked-out day is in no text that grounding could check)."""
    return [(question, _day(date), True)]


@register_env("dialogues")
class DialoguesEnv(Environment):
    """Synthetic LoCoMo-shaped conversations, each one task asking several questions; deterministic in (seed, index)."""

    name = "dialogues"
    summary_columns = ("f1_1_4", "f1_1_5")
    default_l_max = 512
    MAX_TASKS = 2**31
    MAX_SESSIONS = 50
    MAX_TURNS = 200
    ATTEMPTS = 20  # conversations drawn per task until one asks all five categories (defaults: almost always one)
    MAX_ADVERSARIAL = 3  # category-5 questions per conversation, as LoCoMo has about one in five

    def __init__(
        self,
        *,
        num_tasks: int = 256,
        num_sessions: int = 5,
        turns_per_session: int = 16,
        facts_per_speaker: int = 4,
        questions_per_task: int | None = None,
        categories: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5),
        seed: int = 0,
    ):
        """`turns_per_session`: turns of a session, more where its facts need them; `facts_per_speaker`: how many of
        the six relations each speaker tells; `questions_per_task`: None asks every generated question, k a seeded
        sample of k stratified over categories (all of them where fewer were generated); `categories`: which of
        LoCoMo's category codes to ask."""
        for arg, value, low, high in (
            ("num_tasks", num_tasks, 1, self.MAX_TASKS),
            ("num_sessions", num_sessions, 1, self.MAX_SESSIONS),
            ("turns_per_session", turns_per_session, 4, self.MAX_TURNS),
            ("facts_per_speaker", facts_per_speaker, 1, len(RELATIONS)),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InputError(f"dialogues env: {arg} must be an integer in [{low}, {high}], got {value!r}")
        if questions_per_task is not None and (not isinstance(questions_per_task, int)
                                               or isinstance(questions_per_task, bool) or questions_per_task < 1):
            raise InputError(f"dialogues env: questions_per_task must be None or an integer >= 1, "
                             f"got {questions_per_task!r}")
        if (not isinstance(categories, (list, tuple)) or not categories
                or any(isinstance(c, bool) or c not in CATEGORY_NAMES for c in categories)
                or len(set(categories)) != len(categories)):
            raise InputError(f"dialogues env: categories must be a non-empty list of distinct LoCoMo category codes "
                             f"from {sorted(CATEGORY_NAMES)}, got {categories!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"dialogues env: seed must be an integer, got {seed!r}")
        self.num_tasks = num_tasks
        self.num_sessions = num_sessions
        self.turns_per_session = turns_per_session
        self.facts_per_speaker = facts_per_speaker
        self.questions_per_task = questions_per_task
        self.categories = tuple(sorted(categories))
        self.seed = seed

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Task:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"dialogues env: task index {index} out of range [0, {self.num_tasks})")
        task_id = f"dialogues-{self.seed}-{index}"
        # String seeds hash through SHA-512, so each (seed, index) gets its own conversation, independent of call
        # order. A conversation that asks no question of some category is drawn again (rare with the defaults), so
        # the stream does not depend on `categories` or `questions_per_task`; with settings too small for all five,
        # the first conversation that asks any of `categories`.
        fallback = None
        for attempt in range(self.ATTEMPTS):
            rng = random.Random(f"dialogues:{self.seed}:{index}" + (f":{attempt}" if attempt else ""))
            conversation, turns = self._conversation(rng)
            asked = [a for a in conversation.asked if a.category in self.categories]
            if {a.category for a in conversation.asked} == set(CATEGORY_NAMES):
                break
            if fallback is None and asked:
                fallback = rng, conversation, turns, asked
        else:
            if fallback is None:
                raise InputError(f"dialogues env: task {index}: no conversation of facts_per_speaker="
                                 f"{self.facts_per_speaker}, num_sessions={self.num_sessions} asks categories "
                                 f"{list(self.categories)}; tell more facts or ask more categories")
            rng, conversation, turns, asked = fallback
        if self.questions_per_task is not None:
            asked = self._sample(rng, asked, self.questions_per_task)

        chunks = tuple(f"DATE: {session_date(conversation.dates[k])}\n{speaker}: {text}" if first
                       else f"{speaker}: {text}" for k, first, speaker, text in turns)
        session_starts = [i for i, (_, first, _, _) in enumerate(turns) if first]
        questions = []
        for i, a in enumerate(asked):
            question_id = f"{task_id}/q{i}"
            questions.append(Question(question=a.question, answers=(a.gold,), metadata={
                "category": a.category,
                "question_id": question_id,
                "options": adversarial_options(f"dialogues:{self.seed}:{question_id}", a.tempting)
                if a.category == 5 else None,
                "evidence": sorted(s.chunk for s in a.evidence),
                "subject": a.subject,
                "relation": a.relation,
                "when": a.when,
            }))
        pairs, pair_chunks = [], []
        for s in sorted(conversation.statements, key=lambda s: s.chunk):
            for question, answer, dated in s.pairs:
                pairs.append(QAPair(question, answer))
                pair_chunks.append(session_starts[s.session] if dated else s.chunk)
        return Task(
            task_id=task_id,
            question="",
            chunks=chunks,
            answers=(),
            questions=tuple(questions),
            reference_pairs=tuple(pairs),
            metadata={
                "sample_id": task_id,
                "speakers": list(conversation.speakers),
                "num_sessions": self.num_sessions,
                "num_chunks": len(chunks),
                "session_dates": [session_date(d) for d in conversation.dates],
                "session_starts": session_starts,
                "facts": [{"speaker": s.subject, "relation": s.relation, "values": list(s.values), "chunk": s.chunk}
                          for s in sorted(conversation.statements, key=lambda s: s.chunk)],
                "reference_chunks": pair_chunks,
            },
        )

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        return locomo_score(task, prediction)

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        return locomo_answer_prompt(question, context, task)

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return locomo_summary(records)

    # ---- one conversation ------------------------------------------------------------------------------------

    def _conversation(self, rng: random.Random) -> tuple[_Conversation, list[tuple[int, bool, str, str]]]:
        """The facts, questions and turns (session, whether the session's first, speaker, text) of one chat."""
        day = datetime.datetime(2022, 1, 1) + datetime.timedelta(days=rng.randrange(540))
        dates = []
        for _ in range(self.num_sessions):  # days to weeks apart, each at a waking hour
            dates.append(day + datetime.timedelta(minutes=rng.randrange(8 * 60, 22 * 60)))
            day += datetime.timedelta(days=rng.randint(5, 40))
        conv = _Conversation(speakers=tuple(rng.sample(NAMES, 2)), dates=dates)
        told: dict[str, dict[str, list[_Statement]]] = {}
        for person in conv.speakers:
            told[person] = {}
            for relation in rng.sample(RELATIONS, self.facts_per_speaker):
                told[person][relation] = getattr(self, f"_{relation}")(rng, conv, person)
        self._adversarial(rng, conv, told)
        return conv, self._render(rng, conv)

    def _when(self, rng: random.Random, conv: _Conversation, session: int) -> tuple[str, datetime.date]:
        """A relative day told in `session` and the day it names, after the previous session (news since then)."""
        today = conv.dates[session].date()
        since = (today - conv.dates[session - 1].date()).days if session else 8
        # "This morning" and "earlier today" only in an afternoon or evening session.
        options = [(p, d) for p, d in DAYS_BEFORE if d < since and (d or conv.dates[session].hour >= 12)]
        options += [(f"last {WEEKDAYS[(today - datetime.timedelta(days=d)).weekday()]}", d) for d in range(2, 7)
                    if d < since]
        phrase, days = rng.choice(options)
        return phrase, today - datetime.timedelta(days=days)

    def _stages(self, rng: random.Random, p_second: float, same_session: bool) -> list[int]:
        """The sessions a story is told in: one, or two when it goes on (a later session; the same one where allowed
        and there is only one)."""
        n = self.num_sessions
        if rng.random() < p_second and (n > 1 or same_session):
            return sorted(rng.sample(range(n), 2)) if n > 1 else [0, 0]
        return [rng.randrange(n)]

    def _tell(self, rng: random.Random, conv: _Conversation, person: str, relation: str, kind: str, session: int,
              values: tuple[str, ...], pairs: list, follows: _Statement | None = None, species: str = "",
              **slots) -> _Statement:
        if "when" in slots:  # a relative day, also as a sentence starts with it
            slots["When"] = slots["when"][0].upper() + slots["when"][1:]
        text = rng.choice(STATEMENTS[kind]).format(species=species, **slots)
        statement = _Statement(subject=person, relation=relation, session=session, text=text, values=values,
                               pairs=pairs, kind=kind, follows=follows, species=species)
        conv.statements.append(statement)
        return statement

    def _ask(self, rng: random.Random, conv: _Conversation, category: int, key: str, gold: str,
             evidence: list[_Statement], subject: str, relation: str, when: str | None = None, **slots) -> None:
        question = rng.choice(QUESTIONS[key]).format(p=subject, **slots)
        conv.asked.append(_Asked(category, question, gold, list(evidence), subject, relation, when=when))

    # Each story tells one relation of one person, then asks about it; it returns its statements in order.

    def _home(self, rng: random.Random, conv: _Conversation, p: str) -> list[_Statement]:
        sessions = self._stages(rng, 0.6, same_session=False)
        first = pick_unused(rng, CITIES, conv.used["city"])
        told = [self._tell(rng, conv, p, "home", "home", sessions[0], (first,),
                           [(f"Where does {p} live?", first, False)], city=first)]
        if len(sessions) == 2:
            city = pick_unused(rng, CITIES, conv.used["city"])
            when, day = self._when(rng, conv, sessions[1])
            pairs = [(f"Where does {p} live now?", city, False)]
            pairs += _dated_pairs(f"When did {p} move to {city}?", conv.dates[sessions[1]])
            move = self._tell(rng, conv, p, "home", "move", sessions[1], (city,), pairs, follows=told[0], city=city,
                              old=first, when=when)
            if first in move.text:
                pairs.insert(1, (f"Where did {p} live before moving to {city}?", first, False))
            told.append(move)
            self._ask(rng, conv, 1, "homes", f"{first}, {city}", told, p, "home")
            self._ask(rng, conv, 2, "move_date", gold_day(day), [move], p, "home", when=when, city=city)
        latest = told[-1].values[0]
        self._ask(rng, conv, 4, "home", latest, told[-1:], p, "home")
        self._ask(rng, conv, 3, "home_country", CITIES[latest], told[-1:], p, "home")
        return told

    def _job(self, rng: random.Random, conv: _Conversation, p: str) -> list[_Statement]:
        sessions = self._stages(rng, 0.5, same_session=False)
        first = pick_unused(rng, JOBS, conv.used["job"])
        told = [self._tell(rng, conv, p, "job", "job", sessions[0], (first,),
                           [(f"What does {p} do for work?", first, False)], job=first, a=article(first))]
        if len(sessions) == 2:
            job = pick_unused(rng, JOBS, conv.used["job"])
            a = article(job)
            when, day = self._when(rng, conv, sessions[1])
            pairs = [(f"What is {p}'s new job?", job, False)]
            pairs += _dated_pairs(f"When did {p} start working as {a} {job}?", conv.dates[sessions[1]])
            change = self._tell(rng, conv, p, "job", "new_job", sessions[1], (job,), pairs, follows=told[0], job=job,
                                a=a, old=first, old_a=article(first), when=when)
            if f" {first} " in change.text:
                pairs.insert(1, (f"What did {p} work as before becoming {a} {job}?", first, False))
            told.append(change)
            self._ask(rng, conv, 1, "jobs", f"{first}, {job}", told, p, "job")
            self._ask(rng, conv, 2, "job_date", gold_day(day), [change], p, "job", when=when, job=job, a=a)
        latest = told[-1].values[0]
        self._ask(rng, conv, 4, "job", latest, told[-1:], p, "job")
        self._ask(rng, conv, 3, "job_field", JOBS[latest], told[-1:], p, "job")
        return told

    def _pet(self, rng: random.Random, conv: _Conversation, p: str) -> list[_Statement]:
        told = []
        for session in self._stages(rng, 0.4, same_session=True):
            species = pick_unused(rng, SPECIES, conv.used["species"])
            name = pick_unused(rng, PET_NAMES, conv.used["pet"])
            when, day = self._when(rng, conv, session)
            pairs = [(f"What is the name of {p}'s {species}?", name, False)]
            pairs += _dated_pairs(f"When did {p} adopt {name}?", conv.dates[session])
            told.append(self._tell(rng, conv, p, "pet", "pet", session, (name,), pairs,
                                   follows=told[-1] if told else None, species=species, name=name, when=when))
            self._ask(rng, conv, 4, "pet", name, told[-1:], p, "pet", species=species)
            self._ask(rng, conv, 2, "pet_date", gold_day(day), told[-1:], p, "pet", when=when, name=name,
                      species=species)
        if len(told) == 2:
            self._ask(rng, conv, 1, "pets", ", ".join(s.values[0] for s in told), told, p, "pet")
        return told

    def _trip(self, rng: random.Random, conv: _Conversation, p: str) -> list[_Statement]:
        sessions = self._stages(rng, 0.6, same_session=False)
        first = pick_unused(rng, CITIES, conv.used["city"])
        month = _next_month(conv.dates[sessions[0]].date())
        pairs = [(f"Where is {p} planning to travel?", first, False)]
        pairs += _dated_pairs(f"When is {p}'s trip to {first}?", conv.dates[sessions[0]])
        told = [self._tell(rng, conv, p, "trip", "trip", sessions[0], (first,), pairs, city=first)]
        if len(sessions) == 2:
            later = conv.dates[sessions[1]].date()
            if later < month:  # still planning: the destination changes
                city = pick_unused(rng, CITIES, conv.used["city"])
                told.append(self._tell(rng, conv, p, "trip", "trip_changed", sessions[1], (city,),
                                       [(f"Where is {p} traveling instead of {first}?", city, False)],
                                       follows=told[0], city=city, old=first))
                self._ask(rng, conv, 1, "trips", f"{first}, {city}", told, p, "trip")
            elif (later - month).days >= 7:  # the trip is over
                told.append(self._tell(rng, conv, p, "trip", "trip_done", sessions[1], (first,),
                                       [(f"Where did {p} travel?", first, False)], follows=told[0], city=first))
        latest = told[-1].values[0]
        self._ask(rng, conv, 4, "trip", latest, told[-1:], p, "trip")
        self._ask(rng, conv, 3, "trip_country", CITIES[latest], told[-1:], p, "trip")
        self._ask(rng, conv, 2, "trip_date", f"{MONTHS[month.month - 1]} {month.year}", told[:1], p, "trip",
                  when="next month")
        return told

    def _hobby(self, rng: random.Random, conv: _Conversation, p: str) -> list[_Statement]:
        told = []
        for session in self._stages(rng, 0.4, same_session=True):
            hobby = pick_unused(rng, HOBBIES, conv.used["hobby"])
            pairs = [(f"What hobby has {p} taken up?", hobby, False)]
            follows = told[-1] if told else None
            if rng.random() < 0.5:
                when, day = self._when(rng, conv, session)
                pairs += _dated_pairs(f"When did {p} go to a first {hobby} lesson?", conv.dates[session])
                told.append(self._tell(rng, conv, p, "hobby", "hobby_lesson", session, (hobby,), pairs, follows,
                                       hobby=hobby, when=when))
                self._ask(rng, conv, 2, "lesson_date", gold_day(day), told[-1:], p, "hobby", when=when, hobby=hobby)
            else:
                told.append(self._tell(rng, conv, p, "hobby", "hobby", session, (hobby,), pairs, follows,
                                       hobby=hobby))
        if len(told) == 2:
            self._ask(rng, conv, 1, "hobbies", ", ".join(s.values[0] for s in told), told, p, "hobby")
        else:
            self._ask(rng, conv, 4, "hobby", told[0].values[0], told, p, "hobby")
        return told

    def _event(self, rng: random.Random, conv: _Conversation, p: str) -> list[_Statement]:
        (session,) = self._stages(rng, 0.0, same_session=False)
        past, base = pick_unused(rng, EVENTS, conv.used["event"])
        when, day = self._when(rng, conv, session)
        pairs = _dated_pairs(f"When did {p} {base}?", conv.dates[session])
        told = [self._tell(rng, conv, p, "event", "event", session, (past,), pairs, past=past, when=when)]
        self._ask(rng, conv, 2, "event_date", gold_day(day), told, p, "event", when=when, base=base, past=past)
        return told

    def _adversarial(self, rng: random.Random, conv: _Conversation,
                     told: dict[str, dict[str, list[_Statement]]]) -> None:
        """Questions about one speaker's fact asked of the other, who never told one like it."""
        candidates = []
        for x, y in (conv.speakers, conv.speakers[::-1]):
            for relation, statements in told[x].items():
                if relation == "pet":  # every species of the conversation is one person's, once
                    candidates += [(y, s, "pet", s.values[0], {"species": s.species}) for s in statements]
                elif relation in ("home", "job", "trip", "hobby") and relation not in told[y]:
                    candidates.append((y, statements[-1], relation, statements[-1].values[0], {}))
        for y, statement, key, tempting, slots in rng.sample(candidates, min(self.MAX_ADVERSARIAL, len(candidates))):
            question = rng.choice(QUESTIONS[key]).format(p=y, **slots)
            conv.asked.append(_Asked(5, question, NOT_MENTIONED, [statement], y, statement.relation,
                                     tempting=tempting))

    # ---- the turns -------------------------------------------------------------------------------------------

    def _render(self, rng: random.Random, conv: _Conversation) -> list[tuple[int, bool, str, str]]:
        a, b = conv.speakers
        other = {a: b, b: a}
        free = {
            "city": [c for c in CITIES if c not in conv.used["city"]],
            "pet": [n for n in PET_NAMES if n not in conv.used["pet"]],
            "job": [j for j in JOBS if j not in conv.used["job"]],
            "hobby": [h for h in HOBBIES if h not in conv.used["hobby"]],
            "remarks": [],  # the small talk left to say
            "replies": set(),  # the replies said
        }
        by_session: list[list[_Statement]] = [[] for _ in conv.dates]
        for s in conv.statements:
            by_session[s.session].append(s)
        out = []
        for k, statements in enumerate(by_session):
            turns = self._session(rng, k, (a, b), other, self._order(rng, statements, (a, b)), free)
            out += [(k, i == 0, speaker, text) for i, (speaker, text, _) in enumerate(turns)]
            for i, (_, _, statement) in enumerate(turns):
                if statement is not None:
                    statement.chunk = len(out) - len(turns) + i
        return out

    @staticmethod
    def _order(rng: random.Random, statements: list[_Statement], speakers: tuple[str, str]) -> list[_Statement]:
        """A session's statements in a seeded order, the two speakers taking turns while both have news; a story
        told twice in one session (only with one session) keeps its order."""
        queues = []
        for person in rng.sample(speakers, 2):
            own = [s for s in statements if s.subject == person]
            rng.shuffle(own)
            for i, s in enumerate(own):
                if s.follows in own[i + 1:]:
                    j = own.index(s.follows)
                    own[i], own[j] = own[j], own[i]
            queues.append(own)
        ordered = []
        while any(queues):
            ordered += [queue.pop(0) for queue in queues if queue]
        return ordered

    def _session(self, rng: random.Random, k: int, speakers: tuple[str, str], other: dict[str, str],
                 statements: list[_Statement], free: dict[str, list]) -> list[tuple[str, str, _Statement | None]]:
        """One session's turns (speaker, text, the statement it tells): greetings, each statement with the other's
        reaction, small talk filling up to `turns_per_session`, goodbyes; speakers alternate throughout."""
        s = rng.choice(speakers)
        hello, reply = rng.choice(GREETINGS_LATER if k else GREETINGS_FIRST)
        turns = [(s, hello.format(o=other[s]), None), (other[s], reply.format(s=s), None)]
        gaps = [len(turns)]  # where small talk may go: between exchanges
        for statement in statements:
            x, y = statement.subject, other[statement.subject]
            if turns[-1][0] == x:
                again = len(turns) > 2 and any(t[2] is not None and t[0] == x for t in turns[-3:])
                turns.append((y, rng.choice(BRIDGES_AGAIN if again else BRIDGES).format(o=x), None))
            turns.append((x, statement.text, statement))
            reaction, answer = rng.choice(REACTIONS[statement.kind])
            turns.append((y, reaction.format(species=statement.species), None))
            if answer is not None:
                turns.append((x, answer, None))
            gaps.append(len(turns))
        fill = self.turns_per_session - len(turns) - 2
        farewells = 2 if fill < 0 or fill % 2 == 0 else 1
        for _ in range(max(fill, 0) // 2 if farewells == 2 else (fill + 1) // 2):
            gap = rng.choice(gaps)
            gaps = [g + 2 if g > gap else g for g in gaps]
            speaker = other[turns[gap - 1][0]]
            remark, answer = self._small_talk(rng, other[speaker], free)
            turns[gap:gap] = [(speaker, remark, None), (other[speaker], answer, None)]
        last = turns[-1][0]
        bye, reply = rng.choice(FAREWELLS)
        turns.append((other[last], bye.format(o=last), None))
        if farewells == 2:
            turns.append((last, reply.format(s=other[last]), None))
        return turns

    def _small_talk(self, rng: random.Random, listener: str, free: dict[str, list]) -> tuple[str, str]:
        """A remark and its reply, neither said before in this conversation while others are left."""
        if not free["remarks"]:
            free["remarks"] = [(r, replies) for remarks, replies in SMALL_TALK for r in remarks]
            rng.shuffle(free["remarks"])
        remark, replies = free["remarks"].pop()
        reply = rng.choice([r for r in replies if r not in free["replies"]] or replies)
        free["replies"].add(reply)
        job = rng.choice(free["job"])
        return remark.format(
            o=listener, city=rng.choice(free["city"]), pet=rng.choice(free["pet"]), job=job, job_a=article(job),
            hobby=rng.choice(free["hobby"]), food=rng.choice(FOODS), show=rng.choice(SHOWS),
            n=rng.randint(3, 60), day=rng.choice(WEEKDAYS)), reply

    @staticmethod
    def _sample(rng: random.Random, asked: list[_Asked], k: int) -> list[_Asked]:
        """k questions, taken from the categories in turn (each category's in a seeded order), in their order."""
        by_category: dict[int, list[int]] = {}
        for i, a in enumerate(asked):
            by_category.setdefault(a.category, []).append(i)
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_category.items())]
        rng.shuffle(queues)
        chosen: list[int] = []
        while len(chosen) < k and any(queues):
            for queue in queues:
                if queue and len(chosen) < k:
                    chosen.append(queue.pop())
        return [asked[i] for i in sorted(chosen)]
