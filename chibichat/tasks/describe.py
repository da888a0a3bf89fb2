"""Generated open-writing task (EN and JA): a short sentence or a two-line story about what the user names.

describe / describe-ja (kind "conversation", training only):
    user "Give me a sentence on a quiet village." -> assistant "A quiet village feels calm in the evening."
    user "Make up a short story about owls."      -> assistant "Once there were owls that loved to explore.\\n
                                                                 Every evening they came home tired and happy."
The reply is composed from parts: the topic as the user wrote it (copied, first letter upper-case), then
a predicate or a story frame that fits the topic's kind (animal, place, plant, food, weather, sky,
object, season or time of day) and its number (EN: singular, plural or mass noun; "is"/"are", "it"/"they").
A few frames fit only some topics of their kind (`en_frame_fits`, JA_NOT_MADE: nobody "makes" honey), and
an adjective only the topics it fits (no "homemade honey"; a "new" thing is not found old).
A topic is a noun with an optional adjective and determiner ("a big river", "the old bridge", "rivers").

Why: every other generated chat task has a fixed kind of answer (a name, a number, letters, a refusal),
so the quickstart model answered "Write one sentence about the sea." with one of those (`eval skills`
open prompts: 0 of 8 on topic). The corpus-sentence task (tasks/sentences.py) gave prose that was not
about the topic; here the topic is the reply's subject, so a small model learns to carry the user's
topic into its reply, and every reply is plain, grammatical, simple language. Carrying the topic is
copying its tokens, so the English topics are many (150 nouns): with 77 the model carried fewer of the
held-out topics (docs/benchmarks.md, 2026-12-07, session 40).

Kept apart from the held-out open prompts (assets/skills-<lang>.jsonl, checked by tests): no topic noun
is a held-out open prompt's topic word (sea, cat, rain, ...), and no fixed word of a reply frame is
one either, so a reply is on topic only by the topic it carries; the prompt phrasings are worded unlike
the held-out prompts. Each item is keyed by its topic noun, so test topics never occur in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from chibichat.tasks.base import GeneratedTask


@dataclass(frozen=True)
class Topic:
    noun: str  # the key: singular (or the only) form
    kind: str  # a key of the frame tables
    plural: str | None = None  # EN; None: a mass noun ("snow") or a unique one ("the sun")
    adjectives: tuple[str, ...] = ()
    unique: bool = False  # EN "the sun": always with "the", never plural


def _topics(spec: str, kind: str, adjectives: str) -> list[Topic]:
    """EN topics from "noun/plural noun/plural mass the:unique ..." (plural omitted: mass noun)."""
    out = []
    adjs = tuple(adjectives.split(","))
    for entry in spec.split():
        if entry.startswith("the:"):
            out.append(Topic(entry[4:], kind, None, (), unique=True))
        elif "/" in entry:
            sg, pl = entry.split("/")
            out.append(Topic(sg, kind, pl, adjs))
        else:
            out.append(Topic(entry, kind, None, adjs))
    return out


def en_topics() -> list[Topic]:
    return (
        _topics("horse/horses rabbit/rabbits cow/cows duck/ducks fox/foxes bee/bees frog/frogs sheep/sheep "
                "owl/owls goat/goats lion/lions bear/bears squirrel/squirrels turtle/turtles tiger/tigers deer/deer "
                "wolf/wolves hen/hens goose/geese swan/swans parrot/parrots penguin/penguins "
                "monkey/monkeys elephant/elephants donkey/donkeys pony/ponies hedgehog/hedgehogs otter/otters "
                "dolphin/dolphins robin/robins butterfly/butterflies", "animal",
                "little,big,young,old,brown,white,clever")
        + _topics("river/rivers lake/lakes mountain/mountains garden/gardens village/villages city/cities "
                  "farm/farms island/islands bridge/bridges library/libraries school/schools market/markets "
                  "hill/hills field/fields street/streets harbour/harbours valley/valleys "
                  "meadow/meadows town/towns castle/castles museum/museums station/stations "
                  "square/squares bakery/bakeries zoo/zoos desert/deserts cave/caves kitchen/kitchens "
                  "playground/playgrounds", "place",
                  "quiet,old,busy,small,big,beautiful,distant")
        + _topics("rose/roses sunflower/sunflowers tulip/tulips mushroom/mushrooms bush/bushes daisy/daisies "
                  "cactus/cacti lily/lilies orchid/orchids poppy/poppies violet/violets daffodil/daffodils "
                  "marigold/marigolds lavender clover fern/ferns pansy/pansies", "plant",
                  "red,yellow,tall,wild,small,pretty")
        + _topics("orange/oranges pie/pies biscuit/biscuits tea milk egg/eggs honey lemon/lemons "
                  "banana/bananas cherry/cherries grape/grapes peach/peaches pear/pears "
                  "strawberry/strawberries pancake/pancakes sandwich/sandwiches jam", "food",
                  "fresh,warm,sweet,homemade")
        + _topics("snow wind fog thunder sunshine hail frost mist breeze/breezes", "weather",
                  "soft,cold,thick,gentle,morning")
        + _topics("the:sun sunset/sunsets rainbow/rainbows comet/comets planet/planets "
                  "sunrise/sunrises", "sky", "golden,red,long,wide")
        + _topics("book/books chair/chairs lamp/lamps clock/clocks bicycle/bicycles train/trains kite/kites "
                  "window/windows hat/hats shoe/shoes cup/cups letter/letters piano/pianos candle/candles "
                  "key/keys blanket/blankets pencil/pencils bottle/bottles mirror/mirrors basket/baskets "
                  "guitar/guitars camera/cameras radio/radios table/tables bed/beds door/doors bag/bags box/boxes "
                  "spoon/spoons watch/watches ladder/ladders", "object", "old,new,red,small,wooden,blue")
        + _topics("winter summer spring autumn morning/mornings birthday/birthdays holiday/holidays evening/evenings "
                  "weekend/weekends afternoon/afternoons",
                  "time", "long,early,quiet,happy")
    )


# JA topics: noun -> kind (no plural; an adjective, when drawn, goes before the noun).
JA_TOPICS: dict[str, str] = {
    **dict.fromkeys("馬 うさぎ 牛 あひる きつね はち かえる ひつじ ふくろう やぎ ライオン くま りす かめ".split(), "animal"),
    **dict.fromkeys("川 湖 山 庭 村 町 農場 島 橋 図書館 学校 市場 丘 畑 駅 港".split(), "place"),
    **dict.fromkeys("バラ ひまわり チューリップ きのこ 竹 コスモス あじさい".split(), "plant"),
    **dict.fromkeys("パン みかん ケーキ おにぎり お茶 牛乳 たまご クッキー はちみつ レモン".split(), "food"),
    **dict.fromkeys("雪 風 霧 雷 日ざし".split(), "weather"),
    **dict.fromkeys("太陽 夕焼け 虹 オーロラ".split(), "sky"),
    **dict.fromkeys("本 いす ランプ 時計 自転車 電車 たこ 窓 ぼうし くつ コップ 手紙 ピアノ ろうそく かぎ 毛布".split(),
                    "object"),
    **dict.fromkeys("冬 夏 春 秋 朝 誕生日 休みの日".split(), "time"),
}
JA_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "animal": ("小さな", "大きな", "白い", "茶色い", "かしこい"), "place": ("静かな", "古い", "小さな", "大きな", "にぎやかな"),
    "plant": ("赤い", "黄色い", "小さな", "きれいな"), "food": ("あたたかい", "あまい", "手作りの"),
    "weather": ("冷たい", "やさしい", "春の"), "sky": ("大きな", "きれいな"), "object": ("古い", "新しい", "赤い", "小さな"),
    "time": ("静かな", "楽しい"),
}

# Reply frames. EN: (singular/mass, plural); {T} the topic as the user wrote it, first letter upper-case,
# {t} as written. Story frames are two lines. No fixed word of a frame may be a held-out topic word
# (tests/test_describe.py): a reply is on topic only through the topic it carries.
EN_SENTENCES: dict[str, list[tuple[str, str]]] = {
    "any": [("{T} is nice to think about.", "{T} are nice to think about."),
            ("{T} can make a whole day feel special.", "{T} can make a whole day feel special."),
            ("I think {t} is simple but lovely.", "I think {t} are simple but lovely."),
            ("There is something calm and happy about {t}.", "There is something calm and happy about {t}."),
            ("Many people love {t}, and it is easy to see why.", "Many people love {t}, and it is easy to see why.")],
    "animal": [("{T} likes to rest in a warm, quiet spot.", "{T} like to rest in a warm, quiet spot."),
               ("{T} needs care and a safe home.", "{T} need care and a safe home."),
               ("{T} can be a very good friend.", "{T} can be very good friends."),
               ("{T} is curious about everything around it.", "{T} are curious about everything around them.")],
    "place": [("{T} is a good place to spend a quiet afternoon.", "{T} are good places to spend a quiet afternoon."),
              ("{T} looks beautiful early in the day.", "{T} look beautiful early in the day."),
              ("{T} is full of life in the summer.", "{T} are full of life in the summer."),
              ("{T} feels calm in the evening.", "{T} feel calm in the evening.")],
    "plant": [("{T} grows slowly and needs a lot of sun.", "{T} grow slowly and need a lot of sun."),
              ("{T} brings colour to the world in spring.", "{T} bring colour to the world in spring."),
              ("{T} smells sweet in the early summer.", "{T} smell sweet in the early summer.")],
    "food": [("{T} is best when it is fresh.", "{T} are best when they are fresh."),
             ("{T} is a good way to start the day.", "{T} are a good way to start the day."),
             ("{T} is easy to share with friends.", "{T} are easy to share with friends.")],
    "weather": [("{T} changes how the whole day feels.", "{T} change how the whole day feels."),
                ("{T} makes the air feel fresh and clean.", "{T} make the air feel fresh and clean."),
                ("{T} is a good reason to stay inside with a book.", "{T} are a good reason to stay inside.")],
    "sky": [("{T} is beautiful to watch in the evening.", "{T} are beautiful to watch in the evening."),
            ("{T} makes people stop and look up.", "{T} make people stop and look up.")],
    "object": [("{T} is useful almost every day.", "{T} are useful almost every day."),
               ("{T} can last for many years if you take care of it.",
                "{T} can last for many years if you take care of them."),
               ("{T} is found in almost every home.", "{T} are found in almost every home.")],
    "time": [("{T} brings its own kind of joy.", "{T} bring their own kind of joy."),
             ("{T} is a good time to be outside.", "{T} are a good time to be outside."),
             ("{T} always passes too quickly.", "{T} always pass too quickly.")],
}
EN_STORIES: dict[str, list[tuple[str, str]]] = {
    "any": [("One day I saw {t}.\nIt was so lovely that I smiled all day.",
             "One day I saw {t}.\nThey were so lovely that I smiled all day."),
            ("Once upon a time there was {t}.\nEveryone who saw it felt happy.",
             "Once upon a time there were {t}.\nEveryone who saw them felt happy.")],
    "animal": [("Once there was {t} that loved to explore.\nEvery evening it came home tired and happy.",
                "Once there were {t} that loved to explore.\nEvery evening they came home tired and happy."),
               ("{T} was hungry one cold morning.\nA kind girl shared what she had, and it never forgot her.",
                "{T} were hungry one cold morning.\nA kind girl shared what she had, and they never forgot her.")],
    "place": [("Last summer we visited {t}.\nWe still talk about that happy day.",
               "Last summer we visited {t}.\nWe still talk about that happy day."),
              ("My grandfather often told me about {t}.\nThis year I finally saw it with my own eyes.",
               "My grandfather often told me about {t}.\nThis year I finally saw them with my own eyes.")],
    "plant": [("In spring I noticed {t} by the road.\nEvery day it grew a little taller.",
               "In spring I noticed {t} by the road.\nEvery day they grew a little taller.")],
    "food": [("My mother made {t} for my birthday.\nWe shared every bit and laughed all evening.",
              "My mother made {t} for my birthday.\nWe shared every bit and laughed all evening."),
             ("On a cold day we shared {t}.\nNothing ever felt so good.",
              "On a cold day we shared {t}.\nNothing ever felt so good.")],
    "weather": [("{T} came in the evening.\nBy the next day the whole town looked new.",
                 "{T} came in the evening.\nBy the next day the whole town looked new.")],
    "sky": [("Yesterday evening I watched {t}.\nIt was more beautiful than ever.",
             "Yesterday evening I watched {t}.\nThey were more beautiful than ever.")],
    "object": [("I found {t} in my grandmother's attic.\nIt was old, but I loved it at once.",
                "I found {t} in my grandmother's attic.\nThey were old, but I loved them at once.")],
    "time": [("{T} came, and the whole family was together.\nIt was the best day of the year.",
              "{T} came, and the whole family was together.\nIt was the best time of the year."),
             ("{T} came, and the whole family was together.\nIt was the best time of the year.",
              "{T} came, and the whole family was together.\nIt was the best time of the year.")],
}
JA_SENTENCES: dict[str, list[str]] = {
    "any": ["{t}はとてもすてきです。", "{t}を見ると、心がおだやかになります。", "{t}は多くの人に愛されています。",
            "{t}のことを考えると、うれしくなります。"],
    "animal": ["{t}はあたたかい場所で休むのがすきです。", "{t}はよい友だちになります。", "{t}はまわりのことを何でも知りたがります。"],
    "place": ["{t}は静かな午後をすごすのにいい場所です。", "{t}は夕方になると落ち着いた感じがします。", "{t}は夏になるとにぎやかです。"],
    "plant": ["{t}はゆっくりと育ちます。", "{t}は春に町をいろどります。", "{t}はいいにおいがします。"],
    "food": ["{t}はできたてがいちばんです。", "{t}は友だちと分けるとうれしいです。", "{t}は一日のはじめにぴったりです。"],
    "weather": ["{t}は一日の気分を変えます。", "{t}のあとは、気分がすっきりします。", "{t}の日は、家で本を読むのもいいです。"],
    "sky": ["{t}は夕方にながめるととてもきれいです。", "{t}を見ると、みんな足を止めて見上げます。"],
    "object": ["{t}は毎日の生活で役に立ちます。", "{t}は大切に使えば何年ももちます。", "{t}はたいていの家にあります。"],
    "time": ["{t}にはその時だけのよろこびがあります。", "{t}は外に出るのにいい時です。", "{t}はいつもあっという間にすぎます。"],
}
JA_STORIES: dict[str, list[str]] = {
    "any": ["ある日、{t}を見つけました。\nとてもきれいで、一日中うれしい気持ちでした。",
            "むかしむかし、{t}が{v}。\nそれを見た人はみんな幸せな気持ちになりました。"],
    "animal": ["むかし、{t}がいました。\n毎日元気にすごして、夕方にはつかれて家に帰りました。",
               "ある寒い朝、{t}はおなかをすかせていました。\nやさしい女の子がお昼を分けてあげると、{t}はその子をずっとおぼえていました。"],
    "place": ["去年の夏、{t}に行きました。\n今でもあの楽しい日のことを話します。",
              "おじいさんはよく{t}の話をしてくれました。\n今年、ついに自分の目で{t}を見ました。"],
    "plant": ["春、家のそばに{t}を見つけました。\n毎日少しずつ大きくなりました。"],
    "food": ["母が誕生日に{t}を作ってくれました。\nみんなで分けて、遅くまで笑いました。",
             "寒い日に、みんなで{t}を分けました。\nあたたかい気持ちになりました。"],
    "weather": ["夕方、{t}がやってきました。\n次の日、町はすっかり新しく見えました。"],
    "sky": ["きのうの夕方、{t}をながめました。\nいつもよりずっときれいでした。"],
    "object": ["おばあさんの家の屋根うらで{t}を見つけました。\n古かったけれど、すぐに気に入りました。"],
    "time": ["{t}、家族みんながそろいました。\n一年でいちばんの日になりました。"],
}

# Prompt phrasings, {t} the topic. Worded unlike the held-out open prompts ("Write one sentence about
# the sea.", "Tell me a two-line story about a cat."; tests/test_skills.py checks it).
_EN_SENTENCE_ASKS = [o + r + e for o in ("", "please ", "hey, ", "ok, ")
                     for r in ("give me a sentence on {t}", "say a few words about {t}",
                               "could you put something short together about {t}", "let me have one line on {t}",
                               "make a short statement about {t}", "talk about {t} in a single line",
                               "sum up {t} in a few words", "say one thing about {t}",
                               "jot down a sentence about {t}", "describe {t} briefly", "write something simple about {t}",
                               "share a thought about {t}", "compose a line about {t}")
                     for e in ("?" if r.startswith(("could", "what")) else ".",)]
_EN_STORY_ASKS = [o + r + e for o in ("", "please ", "hey, ")
                  for r in ("make up a short story about {t}", "tell a little tale about {t}",
                            "invent a tale about {t}, just two sentences", "could you tell a story with {t} in it",
                            "let me hear a very short story about {t}", "spin a quick tale about {t}",
                            "write a little story about {t}", "give me two lines of story about {t}",
                            "narrate a brief story starring {t}")
                  for e in ("?" if r.startswith("could") else ".",)]
_JA_SENTENCE_ASKS = [o + r for o in ("", "ねえ、", "すみません、")
                     for r in ("{t}について、ひとこと言ってみて。", "{t}のことを少し話して。", "{t}について短く話してください。",
                               "{t}ってどんなもの？短く教えて。", "{t}のよいところをひとつ教えて。", "{t}についてのひとことをお願い。",
                               "{t}を主語にした文をひとつ作って。", "{t}のことを文にしてみてください。", "{t}についてなにか書いてみて。",
                               "{t}が出てくる文をひとつお願いします。")]
_JA_STORY_ASKS = [o + r for o in ("", "ねえ、")
                  for r in ("{t}が出てくる短いお話を作って。", "{t}のお話をひとつ考えてください。", "{t}についての小さなお話を聞かせて。",
                            "{t}が主人公の短いお話をお願い。", "{t}の出てくる物語を作ってください。", "{t}についての物語を短く書いてみて。",
                            "{t}についての小さな物語をお願い。")]

ASKS = {"en": {"sentence": _EN_SENTENCE_ASKS, "story": _EN_STORY_ASKS},
        "ja": {"sentence": _JA_SENTENCE_ASKS, "story": _JA_STORY_ASKS}}


def en_phrase(topic: Topic, rng: random.Random) -> tuple[str, bool]:
    """The topic as a user writes it, and whether it is plural."""
    if topic.unique:
        return "the " + topic.noun, False
    plural = topic.plural is not None and rng.random() < 0.4
    noun = topic.plural if plural else topic.noun
    if topic.adjectives and rng.random() < 0.4:
        noun = rng.choice([a for a in topic.adjectives if not (a == "homemade" and topic.noun in EN_NOT_MADE)]) + " " + noun
    if plural or topic.plural is None:  # plural and mass nouns: bare or "the"
        det = rng.choice(["", "", "the "])
    else:
        det = rng.choice(["a ", "a ", "the "] + ([] if topic.kind in ("sky", "weather", "time") else ["my "]))
        if det == "a " and noun[0] in "aeiou":
            det = "an "
    return det + noun, plural


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# Frames that fit only some topics of their kind. Nobody "makes" an orange or honey; "the best day of the
# year" is a birthday or a holiday, not a season or a morning (they get "the best time"); a thing found
# "old" was not "new"; "there was my duck" / "there was the bridge" is not how a tale begins; sunshine
# is no reason to stay inside.
EN_NOT_MADE = {"orange", "lemon", "milk", "honey", "banana", "cherry", "grape", "peach", "pear", "strawberry"}
EN_DAYS = {"birthday", "holiday"}
JA_NOT_MADE = {"みかん", "牛乳", "はちみつ", "レモン", "たまご"}


def en_frame_fits(frame: str, topic: Topic, phrase: str) -> bool:
    """Whether an EN frame (the form that will be used: singular/mass or plural) fits the topic as the
    user wrote it (see above)."""
    if "made {t}" in frame and topic.noun in EN_NOT_MADE:
        return False
    if "the best day of the year" in frame and topic.noun not in EN_DAYS:
        return False
    if ("It was old" in frame or "They were old" in frame) and "new" in phrase.split():
        return False
    if "stay inside" in frame and topic.noun == "sunshine":
        return False
    return not (("there was {t}" in frame or "there were {t}" in frame) and phrase.startswith(("my ", "the ")))


def en_reply(topic: Topic, phrase: str, plural: bool, story: bool, rng: random.Random) -> str:
    table = EN_STORIES if story else EN_SENTENCES
    # The topic's own frames twice as often as the generic ones; a time of year or day is not "seen" in a
    # story ("One day I saw a quiet birthday"), so it gets only its own story frames.
    generic = [] if story and topic.kind == "time" else table["any"]
    form = 1 if plural else 0
    frames = [f[form] for f in generic + table[topic.kind] * 2 if en_frame_fits(f[form], topic, phrase)]
    return rng.choice(frames).format(T=_cap(phrase), t=phrase)


def ja_reply(noun: str, phrase: str, story: bool, rng: random.Random) -> str:
    table = JA_STORIES if story else JA_SENTENCES
    kind = JA_TOPICS[noun]
    # As in EN, a time (or the weather) is not "found" nor "was there once" in a story: its own frames only.
    generic = [] if story and kind in ("time", "weather") else table["any"]
    frames = [f for f in generic + table[kind] * 2
              if not ("を作って" in f and noun in JA_NOT_MADE) and not ("家で本を読む" in f and noun == "日ざし")
              and not ("古かった" in f and phrase.startswith("新しい"))]  # found new, yet "it was old"
    # an animal "いました", a thing "ありました"
    return rng.choice(frames).format(t=phrase, v="いました" if kind == "animal" else "ありました")


class Describe(GeneratedTask):
    kind = "conversation"
    default_size = {"train": 2000, "test": 200}
    description = "a short sentence or two-line story about the topic the user names"

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0):
        self.lang = lang
        self.name = "describe" if lang == "en" else "describe-ja"
        super().__init__(split, size, seed)
        self.topics = en_topics() if lang == "en" else sorted(JA_TOPICS)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        story = rng.random() < 0.4
        if self.lang == "en":
            topic = rng.choice(self.topics)
            phrase, plural = en_phrase(topic, rng)
            question = _cap(rng.choice(ASKS["en"]["story" if story else "sentence"]).format(t=phrase))
            answer, key, kind = en_reply(topic, phrase, plural, story, rng), topic.noun, topic.kind
        else:
            noun = rng.choice(self.topics)
            kind = JA_TOPICS[noun]
            fits = [a for a in JA_ADJECTIVES[kind] if not (a == "手作りの" and noun in JA_NOT_MADE)]
            phrase = noun if rng.random() < 0.6 else rng.choice(fits) + noun
            question = rng.choice(ASKS["ja"]["story" if story else "sentence"]).format(t=phrase)
            answer, key = ja_reply(noun, phrase, story, rng), noun
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "topic": phrase, "kind": kind, "story": story}
        # The key is the topic noun: a test topic is never written about in training.
        return key, item
