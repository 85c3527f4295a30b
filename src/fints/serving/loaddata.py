"""The load of ``fints loadtest``: history topics, users' styles and the queries sent."""

TOPICS = [
    "cats",
    "the sea",
    "bread",
    "rain",
    "books",
    "music",
    "trains",
    "gardens",
    "coffee",
    "mountains",
    "winter",
    "markets",
]
STYLES = [
    lambda t: f"Arr matey! {t} be a fine treasure, savvy? Yo ho ho, ye landlubber!",
    lambda t: f"Dear reader, {t} merit careful and courteous consideration. Yours faithfully.",
    lambda t: f"{t}. Good. Done.",
    lambda t: f"OMG {t} are SO amazing!!! Totally love love love {t}!!!",
    lambda t: f"Softly, {t} drift through the quiet evening, a verse of gentle light.",
    lambda t: f"Per the analysis, {t} exhibit three measurable properties; see table 2.",
    lambda t: f"Yo, {t}? Straight fire, no cap, fam.",
    lambda t: f"In my grandmother's day, {t} were simpler, and we were grateful for them.",
]
QUERIES = [
    "Tell me about dogs.",
    "What makes a good breakfast?",
    "Describe a thunderstorm.",
    "How do I learn to paint?",
    "What is your favourite season?",
    "Tell me about the moon.",
    "Why do people travel?",
    "Describe a busy city street.",
    "What is a good hobby?",
    "Tell me about friendship.",
    "How should I spend a rainy day?",
    "Describe the ocean.",
]
