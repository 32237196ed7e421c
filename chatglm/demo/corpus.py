"""Deterministic bilingual (Chinese/English) dialogue corpus for the tiny ChatGLM demo model."""

import hashlib
import json
import random

# ---------------------------------------------------------------- data tables
# Question alternatives are "|"-separated. Each question maps to exactly one
# canonical answer per language, so a tiny model sees a consistent target.

SYSTEM_PROMPTS = {
    "en": ["You are a helpful assistant.", "You are ChatGLM, a helpful AI assistant.",
           "You are a friendly assistant. Answer briefly.",
           "You are a helpful assistant. Answer the user's questions."],
    "zh": ["你是一个乐于助人的助手。", "你是ChatGLM，一个乐于助人的人工智能助手。",
           "你是一个友好的助手，请简短回答。", "请用简洁的语言回答用户的问题。"],
}

# intent -> language -> [(questions, answer)]
SOCIAL = {
    "greeting": {
        "en": [("Hello!|Hi!|Hey!|Hello there!|Hi there!|Hey there!|Greetings!|Hi, nice to meet you!",
                "Hello! I'm the ChatGLM demo model. How can I help you?"),
               ("Good morning!|Morning!", "Good morning! How can I help you?"),
               ("Good afternoon!", "Good afternoon! How can I help you?"),
               ("Good evening!", "Good evening! How can I help you?")],
        "zh": [("你好！|您好！|嗨！|哈喽！|你好呀！|嗨，你好！|你好，很高兴认识你！",
                "你好！我是 ChatGLM 演示模型，有什么可以帮你的吗？"),
               ("早上好！|早安！|早！", "早上好！有什么可以帮你的吗？"),
               ("下午好！", "下午好！有什么可以帮你的吗？"),
               ("晚上好！", "晚上好！有什么可以帮你的吗？")],
    },
    "identity": {
        "en": [("Who are you?|What's your name?|What is your name?|What are you?|Introduce yourself.|"
                "Tell me about yourself.|Are you ChatGLM?|Are you ChatGLM-6B?|Which model are you?",
                "I'm the ChatGLM demo model, a tiny model bundled with the chatglm package for testing, "
                "not the real ChatGLM-6B.")],
        "zh": [("你是谁？|你叫什么名字？|你的名字是什么？|介绍一下你自己。|请做个自我介绍。|"
                "你是ChatGLM吗？|你是ChatGLM-6B吗？|你是什么模型？",
                "我是 ChatGLM 演示模型，一个随 chatglm 包附带、用于测试的小模型，不是真正的 ChatGLM-6B。")],
    },
    "capability": {
        "en": [("What can you do?|What are you able to do?|Can you help me?|What are your limits?|"
                "How smart are you?|What are you good at?|What kinds of questions can you answer?",
                "I'm tiny, so I can only answer simple greetings and questions. "
                "For real use, load a ChatGLM checkpoint.")],
        "zh": [("你能做什么？|你会什么？|你能帮我吗？|你有什么局限？|你有多聪明？|你擅长什么？|你能回答哪些问题？",
                "我很小，只能回答简单的问候和问题。实际使用请加载 ChatGLM 模型权重。")],
    },
    "how_are_you": {
        "en": [("How are you?|How are you doing?|How's it going?|How are you today?|Are you doing well?",
                "I'm doing well, thank you! How can I help you?")],
        "zh": [("你好吗？|最近怎么样？|你今天好吗？|你还好吗？|最近好吗？", "我很好，谢谢！有什么可以帮你的吗？")],
    },
    "thanks": {
        "en": [("Thanks!|Thank you!|Thank you very much!|Thanks a lot!|Many thanks!|Thx!",
                "You're welcome! Anything else I can help with?")],
        "zh": [("谢谢！|谢谢你！|多谢！|非常感谢！|太感谢了！|谢啦！", "不客气！还有什么可以帮你的吗？")],
    },
    "goodbye": {
        "en": [("Goodbye!|Bye!|Bye bye!|See you later!|See you!|I have to go now, bye!",
                "Goodbye! Have a nice day."),
               ("Good night!", "Good night! Sleep well.")],
        "zh": [("再见！|拜拜！|回头见！|下次见！|我先走了，再见！", "再见！祝你有美好的一天。"),
               ("晚安！", "晚安！祝你好梦。")],
    },
}

# (en questions, en answer, zh questions, zh answer)
FACTS = [
    ("What color is the sky?|What colour is the sky?|What is the color of the sky?",
     "The sky is blue on a clear day.", "天空是什么颜色的？|天空是什么颜色？", "晴天时天空是蓝色的。"),
    ("What color is grass?|What colour is grass?|What is the color of grass?",
     "Grass is green.", "草是什么颜色的？|小草是什么颜色？", "草是绿色的。"),
    ("What color is snow?|What colour is snow?", "Snow is white.", "雪是什么颜色的？|雪是什么颜色？", "雪是白色的。"),
    ("What color is a banana?|What colour are ripe bananas?", "A ripe banana is yellow.",
     "香蕉是什么颜色的？|成熟的香蕉是什么颜色？", "成熟的香蕉是黄色的。"),
    ("How many days are in a week?|How many days does a week have?|How many days in a week?",
     "There are 7 days in a week.", "一周有几天？|一个星期有多少天？|一星期有几天？", "一周有7天。"),
    ("How many months are in a year?|How many months does a year have?|How many months in a year?",
     "There are 12 months in a year.", "一年有几个月？|一年有多少个月？", "一年有12个月。"),
    ("How many days are in a year?|How many days does a year have?",
     "A year has 365 days, or 366 in a leap year.", "一年有多少天？|一年有几天？", "一年有365天，闰年有366天。"),
    ("How many hours are in a day?|How many hours does a day have?", "There are 24 hours in a day.",
     "一天有几个小时？|一天有多少小时？", "一天有24小时。"),
    ("How many minutes are in an hour?|How many minutes in an hour?", "There are 60 minutes in an hour.",
     "一小时有多少分钟？|一个小时有几分钟？", "一小时有60分钟。"),
    ("How many seconds are in a minute?|How many seconds in a minute?", "There are 60 seconds in a minute.",
     "一分钟有多少秒？|一分钟有几秒？", "一分钟有60秒。"),
    ("At what temperature does water boil?|What is the boiling point of water?",
     "Water boils at 100 °C (212 °F) at sea level.", "水在多少度沸腾？|水的沸点是多少？|水烧到多少度会开？",
     "在标准大气压下，水的沸点是100摄氏度。"),
    ("At what temperature does water freeze?|What is the freezing point of water?",
     "Water freezes at 0 °C (32 °F).", "水在多少度结冰？|水的冰点是多少？", "水在0摄氏度结冰。"),
    ("What is the largest planet?|Which planet is the biggest?|What is the largest planet in the solar system?",
     "Jupiter is the largest planet in the solar system.", "最大的行星是哪个？|太阳系最大的行星是什么？|哪颗行星最大？",
     "木星是太阳系中最大的行星。"),
    ("Which planet is called the Red Planet?|What is the Red Planet?", "Mars is called the Red Planet.",
     "哪颗行星被称为红色星球？|红色星球是哪颗行星？", "火星被称为红色星球。"),
    ("Which planet do we live on?|What planet do we live on?", "We live on Earth.",
     "我们住在哪个星球上？|我们生活在哪颗行星上？", "我们生活在地球上。"),
    ("Is the Sun a star?|What is the Sun?", "The Sun is a star.", "太阳是恒星吗？|太阳是什么？", "太阳是一颗恒星。"),
    ("How many continents are there?|How many continents are on Earth?", "There are 7 continents.",
     "世界上有几个大洲？|地球上有多少个大洲？", "地球上有七大洲。"),
    ("What is the largest ocean?|Which ocean is the biggest?", "The Pacific Ocean is the largest ocean.",
     "最大的海洋是哪个？|世界上最大的大洋是什么？", "太平洋是世界上最大的大洋。"),
    ("What is the highest mountain in the world?|What is the tallest mountain?",
     "Mount Everest is the highest mountain in the world.", "世界上最高的山是哪座？|最高的山峰是什么？",
     "世界最高峰是珠穆朗玛峰。"),
    ("What is the longest river in China?|Which river is the longest in China?",
     "The Yangtze is the longest river in China.", "中国最长的河是哪条？|中国最长的河流是什么？", "长江是中国最长的河流。"),
    ("How many legs does a spider have?|How many legs do spiders have?", "A spider has 8 legs.",
     "蜘蛛有几条腿？|蜘蛛有多少条腿？", "蜘蛛有8条腿。"),
    ("How many legs does a dog have?|How many legs do dogs have?", "A dog has 4 legs.",
     "狗有几条腿？|小狗有几条腿？", "狗有4条腿。"),
    ("What do bees make?|What food do bees produce?", "Bees make honey.", "蜜蜂会酿什么？|蜜蜂生产什么？", "蜜蜂会酿蜂蜜。"),
    ("What is H2O?|What does H2O stand for?", "H2O is water.", "H2O是什么？|H2O代表什么物质？", "H2O是水。"),
    ("What gas do plants absorb?|What gas do plants take in from the air?",
     "Plants absorb carbon dioxide from the air.", "植物吸收什么气体？|植物从空气中吸收什么气体？", "植物从空气中吸收二氧化碳。"),
    ("How many colors are in a rainbow?|How many colours does a rainbow have?", "A rainbow has 7 colors.",
     "彩虹有几种颜色？|彩虹有多少种颜色？", "彩虹有七种颜色。"),
]

CAPITALS = [  # (en country, en city, zh country, zh city)
    ("China", "Beijing", "中国", "北京"), ("Japan", "Tokyo", "日本", "东京"), ("France", "Paris", "法国", "巴黎"),
    ("the United Kingdom", "London", "英国", "伦敦"), ("the United States", "Washington, D.C.", "美国", "华盛顿"),
    ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("India", "New Delhi", "印度", "新德里"), ("Spain", "Madrid", "西班牙", "马德里"), ("Egypt", "Cairo", "埃及", "开罗"),
    ("South Korea", "Seoul", "韩国", "首尔"), ("Brazil", "Brasilia", "巴西", "巴西利亚"),
]
CAPITAL_Q = {"en": "What is the capital of {c}?|What's the capital of {c}?|Which city is the capital of {c}?|"
                   "Capital of {c}?|Tell me the capital of {c}.",
             "zh": "{c}的首都是哪里？|{c}的首都是什么？|{c}的首都是哪个城市？|{c}首都在哪？"}
CAPITAL_A = {"en": "The capital of {c} is {city}.", "zh": "{c}的首都是{city}。"}
# The same fact asked the other way round gets the same answer.
CAPITAL_REV_Q = {"en": "Which country has {city} as its capital?|{city} is the capital of which country?|"
                       "What country is {city} the capital of?",
                 "zh": "{city}是哪个国家的首都？|{city}是哪国的首都？|{city}是什么国家的首都？"}

# Bare "3 + 4 = ?" forms live only in the English pool (Chinese says "3+4=几？"),
# so a language-neutral question never gets answers in two languages.
ARITH_Q = {
    ("en", "+"): "What is {a} plus {b}?|What's {a} + {b}?|{a} + {b} = ?|{a}+{b}=?|What is {a} + {b}?|"
                 "How much is {a} plus {b}?|Calculate {a} + {b}.|{a} plus {b}?|What do you get if you add {a} and {b}?",
    ("en", "-"): "What is {a} minus {b}?|What's {a} - {b}?|{a} - {b} = ?|{a}-{b}=?|How much is {a} minus {b}?|"
                 "Calculate {a} - {b}.|What do you get if you subtract {b} from {a}?",
    ("zh", "+"): "{a}加{b}等于几？|{a}+{b}等于几？|{a}加{b}等于多少？|{a}+{b}=几？|{a}+{b}等于多少？|计算{a}+{b}。|{a}加上{b}是多少？",
    ("zh", "-"): "{a}减{b}等于几？|{a}-{b}等于几？|{a}减{b}等于多少？|{a}-{b}=几？|计算{a}-{b}。|{a}减去{b}是多少？",
}
ARITH_A = {("en", "+"): "{a} + {b} = {c}.", ("en", "-"): "{a} - {b} = {c}.",
           ("zh", "+"): "{a}加{b}等于{c}。", ("zh", "-"): "{a}减{b}等于{c}。"}

DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = "一二三四五六日"  # questions say 星期X or 周X; answers always say 星期X
WEEKDAY_Q = {"en": "What day comes after {d}?|What is the day after {d}?|Which day follows {d}?|"
                   "What comes after {d}?|If today is {d}, what day is tomorrow?",
             "zh": "{d}之后是星期几？|{d}的后一天是星期几？|{d}的下一天是星期几？|如果今天是{d}，明天是星期几？"}
WEEKDAY_A = {"en": "The day after {d} is {n}.", "zh": "{d}之后是{n}。"}

WORDS = [  # (English, Chinese)
    ("apple", "苹果"), ("banana", "香蕉"), ("water", "水"), ("cat", "猫"), ("dog", "狗"), ("book", "书"),
    ("sun", "太阳"), ("moon", "月亮"), ("tree", "树"), ("flower", "花"), ("house", "房子"), ("car", "汽车"),
    ("school", "学校"), ("teacher", "老师"), ("friend", "朋友"), ("computer", "电脑"), ("rice", "米饭"),
    ("tea", "茶"), ("milk", "牛奶"), ("bird", "鸟"), ("fish", "鱼"), ("river", "河"), ("mountain", "山"),
    ("rain", "雨"), ("snow", "雪"), ("red", "红色"), ("green", "绿色"), ("blue", "蓝色"), ("happy", "快乐"),
    ("love", "爱"), ("thank you", "谢谢"), ("good morning", "早上好"),
]
# (question language, direction) -> (questions, answer)
TRANSLATE = {
    ("en", "to_zh"): ('How do you say "{en}" in Chinese?|How do you say {en} in Chinese?|What is {en} in Chinese?|'
                      "What's the Chinese for {en}?|Translate {en} into Chinese.|Translate \"{en}\" to Chinese.",
                      'The Chinese for "{en}" is {zh}.'),
    ("en", "to_en"): ("How do you say {zh} in English?|What does {zh} mean?|What is {zh} in English?|"
                      "What's the English for {zh}?|Translate {zh} into English.",
                      'The English for {zh} is "{en}".'),
    ("zh", "to_zh"): ("{en}用中文怎么说？|{en}的中文是什么？|{en}是什么意思？|把{en}翻译成中文。|“{en}”翻译成中文是什么？",
                      "“{en}”的中文是“{zh}”。"),
    ("zh", "to_en"): ("{zh}用英文怎么说？|{zh}用英语怎么说？|{zh}的英文是什么？|把{zh}翻译成英文。|“{zh}”的英语是什么？",
                      "“{zh}”的英文是“{en}”。"),
}

# Out-of-scope requests: the model should learn one polite refusal per language.
UNKNOWN_Q = {
    "en": "What's the weather like today?|Will it rain tomorrow?|Write a poem about the sea.|Write me a short story.|"
          "Explain quantum mechanics.|What is the meaning of life?|Who won the World Cup in 2018?|"
          "What is Apple's stock price today?|Write a Python function to sort a list.|Summarize this article for me.|"
          "What's the latest news?|Recommend a good movie.|How do I fix my car's engine?|What time is it now?|"
          "Solve the equation x^2 - 5x + 6 = 0.|Tell me a joke.|Who is the president of France?|"
          "What is 123 times 456?|Plan a trip to Japan for me.|How do I cook mapo tofu?|"
          "Explain how a neural network works.|What should I buy for my mother's birthday?|"
          "Translate this paragraph into French.|Write an email to my boss.|What is the population of Brazil?|"
          "How does the stock market work?|How can I learn the piano?|What is the best programming language?|"
          "Do my math homework for me.|Describe the history of the Roman Empire.",
    "zh": "今天天气怎么样？|明天会下雨吗？|写一首关于大海的诗。|给我讲一个故事。|解释一下量子力学。|人生的意义是什么？|"
          "2018年世界杯冠军是谁？|今天的股价是多少？|帮我写一个排序的Python函数。|帮我总结这篇文章。|最近有什么新闻？|"
          "推荐一部好看的电影。|我的汽车发动机坏了怎么修？|现在几点了？|解方程x^2-5x+6=0。|讲个笑话吧。|法国总统是谁？|"
          "123乘以456等于多少？|帮我规划一次日本旅行。|麻婆豆腐怎么做？|神经网络是怎么工作的？|我妈妈生日送什么礼物好？|"
          "把这段话翻译成法语。|帮我给老板写一封邮件。|巴西有多少人口？|股市是怎么运作的？|怎样学好钢琴？|"
          "最好的编程语言是什么？|帮我做数学作业。|写一首关于爱情的歌。",
}
UNKNOWN_A = {"en": "I'm only a tiny demo model, so I can't answer that. Load a real ChatGLM checkpoint for that.",
             "zh": "我只是一个很小的演示模型，回答不了这个问题。如需使用，请加载真正的 ChatGLM 模型。"}

PREFIXES = {"en": ["Quick question: ", "Hey, ", "Please tell me, ", "Excuse me, "],
            "zh": ["请问", "请告诉我，", "问一下，", "我想知道，"]}
# Sloppy-typing substitutes for the trailing punctuation mark.
ALT_END = {"?": " ?", "？": "?", "!": ".", "！": "~", ".": "!", "。": "."}

FIRST_WEIGHTS = {"greeting": 12, "identity": 8, "capability": 8, "how_are_you": 5, "thanks": 3, "goodbye": 3,
                 "fact": 18, "arith": 18, "weekday": 6, "translate": 10, "unknown": 10}
QUESTION_INTENTS = ["identity", "capability", "how_are_you", "fact", "arith", "weekday", "translate", "unknown"]
NUM_CONVERSATIONS = 9000


# ------------------------------------------------------------------ generators

def _surface(rng, q, lang):
    # Vary how the user types, never what they ask.
    end = q[-1]
    if end in "?？" and rng.random() < 0.1:
        q = rng.choice(PREFIXES[lang]) + (q[0].lower() + q[1:] if lang == "en" else q)
    if lang == "en":
        r = rng.random()
        q = q.lower() if r < 0.2 else (q[0].lower() + q[1:] if r < 0.3 else q)
    if end in ALT_END:
        r = rng.random()
        if r < 0.25:
            q = q[:-1]
        elif r < 0.35:
            q = q[:-1] + ALT_END[end]
    return q


def _social(rng, lang, intent):
    questions, answer = rng.choice(SOCIAL[intent][lang])
    return rng.choice(questions.split("|")), answer


def _fact(rng, lang):
    # Capitals are 15 of ~41 facts; weight them accordingly.
    if rng.random() < len(CAPITALS) / (len(CAPITALS) + len(FACTS)):
        en_c, en_city, zh_c, zh_city = rng.choice(CAPITALS)
        c, city = (en_c, en_city) if lang == "en" else (zh_c, zh_city)
        pool = CAPITAL_Q if rng.random() < 0.7 else CAPITAL_REV_Q
        q = rng.choice(pool[lang].split("|")).format(c=c, city=city)
        return q, CAPITAL_A[lang].format(c=c, city=city)
    en_q, en_a, zh_q, zh_a = rng.choice(FACTS)
    questions, answer = (en_q, en_a) if lang == "en" else (zh_q, zh_a)
    return rng.choice(questions.split("|")), answer


def _arith(rng, lang):
    op = rng.choice("+-")
    a, b = rng.randint(0, 10), rng.randint(0, 10)  # small enough for a tiny model to get every sum right
    if op == "-" and a < b:  # keep results non-negative
        a, b = b, a
    c = a + b if op == "+" else a - b
    q = rng.choice(ARITH_Q[lang, op].split("|")).format(a=a, b=b)
    return q, ARITH_A[lang, op].format(a=a, b=b, c=c)


def _weekday(rng, lang):
    i = rng.randrange(7)
    if lang == "en":
        d, n = DAYS_EN[i], DAYS_EN[(i + 1) % 7]
        q_day = d
    else:
        d, n = "星期" + DAYS_ZH[i], "星期" + DAYS_ZH[(i + 1) % 7]
        q_day = rng.choice(["星期", "周"]) + DAYS_ZH[i]
    return rng.choice(WEEKDAY_Q[lang].split("|")).format(d=q_day), WEEKDAY_A[lang].format(d=d, n=n)


def _translate(rng, lang):
    en, zh = rng.choice(WORDS)
    questions, answer = TRANSLATE[lang, rng.choice(["to_zh", "to_en"])]
    return rng.choice(questions.split("|")).format(en=en, zh=zh), answer.format(en=en, zh=zh)


def _unknown(rng, lang):
    return rng.choice(UNKNOWN_Q[lang].split("|")), UNKNOWN_A[lang]


def _turn(rng, lang, intent):
    if intent in SOCIAL:
        q, a = _social(rng, lang, intent)
    else:
        q, a = {"fact": _fact, "arith": _arith, "weekday": _weekday,
                "translate": _translate, "unknown": _unknown}[intent](rng, lang)
    return [{"role": "user", "content": _surface(rng, q, lang)}, {"role": "assistant", "content": a}]


def _conversation(rng):
    lang = rng.choice(["en", "zh"])
    msgs = []
    if rng.random() < 0.1:
        sys_lang = lang if rng.random() < 0.8 else rng.choice(["en", "zh"])
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[sys_lang])})
    intent = rng.choices(list(FIRST_WEIGHTS), weights=list(FIRST_WEIGHTS.values()))[0]
    msgs += _turn(rng, lang, intent)
    # ~25% get one or two follow-ups: thanks, another question, or goodbye.
    if intent != "goodbye" and rng.random() < 0.25:
        for _ in range(1 if rng.random() < 0.7 else 2):
            if rng.random() < 0.05:  # occasionally the user switches language
                lang = "zh" if lang == "en" else "en"
            r = rng.random()
            if intent != "thanks" and r < 0.4:
                intent = "thanks"
            elif r < 0.8:
                intent = rng.choice(QUESTION_INTENTS)
            else:
                intent = "goodbye"
            msgs += _turn(rng, lang, intent)
            if intent == "goodbye":
                break
    return msgs


def conversations(seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [_conversation(rng) for _ in range(NUM_CONVERSATIONS)]


def texts(seed: int = 0) -> list[str]:
    return [m["content"] for conv in conversations(seed) for m in conv]


if __name__ == "__main__":
    convs = conversations()
    all_texts = [m["content"] for conv in convs for m in conv]
    dump = json.dumps(convs, ensure_ascii=False, sort_keys=True).encode("utf-8")
    turns = {}
    for conv in convs:
        n = sum(m["role"] == "user" for m in conv)
        turns[n] = turns.get(n, 0) + 1
    print(f"conversations: {len(convs)}")
    print(f"turns per conversation: {dict(sorted(turns.items()))}")
    print(f"with system prompt: {sum(c[0]['role'] == 'system' for c in convs)}")
    print(f"messages: {len(all_texts)}, characters: {sum(map(len, all_texts))}, "
          f"unique texts: {len(dict.fromkeys(all_texts))}")
    print(f"json dump: {len(dump)} bytes, sha256 {hashlib.sha256(dump).hexdigest()}")
    for conv in convs[:: len(convs) // 5][:5]:
        print("---")
        for m in conv:
            print(f"{m['role']:>9}: {m['content']}")
