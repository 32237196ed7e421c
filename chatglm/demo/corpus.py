"""Deterministic bilingual (Chinese/English) dialogue corpus for the tiny ChatGLM demo model: short chats, long
chats that stay on topic, ChatGLM3 tool calls to the demo tools (chatglm/demo/tools.py) and code-interpreter
turns, all as ChatGLM3 message lists ({"role", "content", "metadata"?, "tools"?})."""

import datetime
import hashlib
import json
import math
import random

from ..chat.tools import TOOLS_PROMPT, ToolRegistry, tool_call_code
from . import tools as demo_tools

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
CAPITAL_FOLLOW_Q = {"en": "And {c}?|What about {c}?|And the capital of {c}?|How about {c}?",
                    "zh": "那{c}呢？|{c}呢？|那{c}的首都呢？"}
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
                 "fact": 18, "arith": 24, "weekday": 6, "translate": 10, "unknown": 10}
# "Repeat after me": a reply that only copying can predict, the skill calls and answers from results need.
ECHO_Q = {"en": "Repeat after me: {s}|Say this back to me: {s}|Please repeat: {s}|Copy this exactly: {s}|Echo: {s}",
          "zh": "跟我说：{s}|请重复：{s}|照着说一遍：{s}|重复这句话：{s}"}
QUESTION_INTENTS = ["identity", "capability", "how_are_you", "fact", "arith", "weekday", "translate", "unknown"]


# ---------------------------------------------------------------- tools (ChatGLM3 function calling)

# Tools the model never needs: they vary the system prompt so the model reads which tools it has.
OTHER_TOOLS = [
    {"name": "send_email", "description": "Send an email to someone.",
     "parameters": {"type": "object", "properties": {
         "to": {"type": "string", "description": "the address"},
         "subject": {"type": "string", "description": "the subject line"}}, "required": ["to", "subject"]}},
    {"name": "play_music", "description": "Play a song on the speaker.",
     "parameters": {"type": "object", "properties": {
         "song": {"type": "string", "description": "the song's title"}}, "required": ["song"]}},
    {"name": "set_alarm", "description": "Set an alarm clock.",
     "parameters": {"type": "object", "properties": {
         "time": {"type": "string", "description": "the time, e.g. 07:30"}}, "required": ["time"]}},
]


def demo_tool_specs() -> list[dict]:
    """The demo tools as `chatglm chat --tools chatglm/demo/tools.py` shows them to the model."""
    return ToolRegistry.from_module(demo_tools).chatglm3()


# (English, Chinese): the demo table's cities and a few more. A tiny model learns to copy a name only from many
# examples of it, so the list is short and the table's cities are most of it.
CITIES = [(en, zh) for zh, en in demo_tools.CITY_ZH.items()] + [
    ("Nanjing", "南京"), ("Tianjin", "天津"), ("Chongqing", "重庆"), ("Osaka", "大阪"), ("Bangkok", "曼谷"),
    ("Dubai", "迪拜"), ("Chicago", "芝加哥"), ("Toronto", "多伦多"),
]
CONDITIONS = demo_tools.CONDITION_ZH
WEATHER_Q = {
    "en": "What's the weather in {c}?|What is the weather like in {c}?|How's the weather in {c} today?|"
          "What's the weather like in {c} right now?|Is it raining in {c}?|What's the temperature in {c}?|"
          "Weather in {c}?|Tell me the weather in {c}.|How cold is it in {c}?|Check the weather in {c} for me.|"
          "Can you look up the weather in {c}?|What is the weather in {c} today?",
    "zh": "{c}天气怎么样？|{c}今天天气如何？|{c}现在多少度？|查一下{c}的天气。|{c}下雨了吗？|{c}的天气怎么样？|"
          "帮我看看{c}的天气。|今天{c}冷不冷？|{c}今天天气怎么样？|{c}现在天气如何？|请查询{c}的天气。",
}
WEATHER_FOLLOW_Q = {"en": "And in {c}?|What about {c}?|And {c}?|How about {c}?", "zh": "那{c}呢？|{c}呢？|那{c}的天气呢？"}
WEATHER_A = {"en": "It is {cond} in {city} right now: {t} °C, humidity {h}%.",
             "zh": "{city}现在{cond}，气温{t}°C，湿度{h}%。"}
WEATHER_ERR_A = {"en": "Sorry, I have no weather data for {city}.", "zh": "抱歉，我没有{city}的天气数据。"}
NO_CITY_Q = {"en": "What's the weather like today?|How's the weather?|Will it rain today?|What's the weather?",
             "zh": "今天天气怎么样？|天气如何？|今天会下雨吗？|天气怎么样？"}
NO_CITY_A = {"en": "Which city would you like the weather for?", "zh": "请问你想查询哪个城市的天气？"}
TIME_Q = {"en": "What time is it?|What time is it now?|What's the time?|What is today's date?|What day is it today?|"
                "Tell me the current time.|What's the date today?|Do you know what time it is?",
          "zh": "现在几点了？|现在几点？|今天几号？|今天是几月几号？|现在是什么时间？|告诉我现在的时间。|今天星期几？|现在是几点钟？"}
TIME_A = {"en": "It is {time} on {weekday}, {date}.", "zh": "现在是{date} {weekday} {time}。"}
# (English words, Chinese words) the user writes; the call copies them and the tool understands both.
UNIT_PAIRS = [("kilometers", "miles", "公里", "英里"), ("miles", "kilometers", "英里", "公里"),
              ("meters", "feet", "米", "英尺"), ("feet", "meters", "英尺", "米"),
              ("inches", "centimeters", "英寸", "厘米"), ("centimeters", "inches", "厘米", "英寸"),
              ("kilograms", "pounds", "公斤", "磅"), ("pounds", "kilograms", "磅", "公斤"),
              ("grams", "ounces", "克", "盎司"), ("ounces", "grams", "盎司", "克"),
              ("liters", "gallons", "升", "加仑"), ("gallons", "liters", "加仑", "升"),
              ("celsius", "fahrenheit", "摄氏度", "华氏度"), ("fahrenheit", "celsius", "华氏度", "摄氏度")]
CONVERT_Q = {"en": "How many {b} is {v} {a}?|Convert {v} {a} to {b}.|What is {v} {a} in {b}?|{v} {a} in {b}?|"
                   "How many {b} are in {v} {a}?|Please convert {v} {a} into {b}.",
             "zh": "{v}{a}是多少{b}？|{v}{a}等于多少{b}？|把{v}{a}换算成{b}。|{v}{a}合多少{b}？|{v}{a}换算成{b}是多少？"}
CONVERT_A = {"en": "{v} {a} is {r} {b}.", "zh": "{v}{a}等于{r}{b}。"}
RANDOM_Q = {"en": "Give me a random number between {a} and {b}.|Pick a random number from {a} to {b}.|"
                  "Pick a number between {a} and {b}.|Generate a random number between {a} and {b}.|"
                  "Random number from {a} to {b}, please.",
            "zh": "给我一个{a}到{b}之间的随机数。|从{a}到{b}中随机选一个数。|随机生成一个{a}到{b}之间的数。|帮我在{a}到{b}之间抽一个数。"}
RANDOM_ANY_Q = {"en": "Give me a random number.|Pick a random number.|Surprise me with a random number.",
                "zh": "给我一个随机数。|随便选一个数。|生成一个随机数。"}
DICE_Q = {"en": "Roll a die.|Roll a dice for me.|Throw a die.", "zh": "掷个骰子。|帮我掷一下骰子。|扔个骰子吧。"}
RANDOM_A = {"en": "Your random number is {n}.", "zh": "随机数是{n}。"}
WEEKDAYS_ZH = dict(zip(DAYS_EN, ["星期" + d for d in DAYS_ZH]))

# Names that go verbatim from a question into a call and from an observation into an answer; the demo tokenizer
# keeps each one a single token of its own (chatglm.demo.train). Single Chinese characters are left out: they are
# tokens already, and as symbols they would split the words they occur in.
COPIED = [c for pair in CITIES for c in pair] + [u for pair in UNIT_PAIRS for u in pair if len(u) > 1] + \
    [w for pair in CONDITIONS.items() for w in pair] + DAYS_EN

# ---------------------------------------------------------------- code interpreter

# ChatGLM3's interpreter system prompts (composite demo / PROMPT_en.md), with the kernel's working folder.
INTERPRETER_SYSTEM = {
    "zh": "你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，你可以运行代码并得到结果，"
          "如果运行结果有错误，你需要尽可能对代码进行改进。你可以处理用户上传到电脑上的文件，文件默认存储路径是{path}。",
    "en": "You are an intelligent AI assistant, named ChatGLM3. You are connected to a computer, but please note "
          "that you cannot connect to the internet. When using Python to solve tasks, you can run the code and get "
          "the results. If there are errors in the running results, you need to improve the code as much as "
          "possible. You can process files uploaded by users to your computer, and the default storage path for "
          "files is {path}.",
}
# (question templates per language, code); {a} {b} numbers, {l} a list in Python syntax,
# {lw} / {lz} the same list in English / Chinese words, {r} what the code printed. The answer only restates the
# printed result: worked arithmetic ("3 + 4 = 7.") is what the chats answer without a kernel.
ANSWER = {"en": "The result is {r}.", "zh": "结果是{r}。"}
CODE_TASKS = {
    "mul": ({"en": "What is {a} * {b}?|What is {a} times {b}?|What's {a} multiplied by {b}?|Calculate {a} * {b}.|"
                   "{a} * {b} = ?|{a}*{b}=?|Multiply {a} by {b}.|What is {a} × {b}?|How much is {a} times {b}?",
             "zh": "{a}乘以{b}等于多少？|{a}*{b}等于几？|{a}乘{b}是多少？|计算{a}*{b}。|{a}×{b}=?|算一下{a}乘以{b}。|"
                   "{a}乘以{b}是多少？"},
            "print({a} * {b})"),
    "add": ({"en": "What is {a} + {b}?|What is {a} plus {b}?|Calculate {a} + {b}.|{a} + {b} = ?|Add {a} and {b}.|"
                   "What's the sum of {a} and {b}?",
             "zh": "{a}加{b}等于多少？|{a}+{b}等于几？|计算{a}+{b}。|{a}加上{b}是多少？|{a}和{b}的和是多少？"},
            "print({a} + {b})"),
    "sub": ({"en": "What is {a} - {b}?|What is {a} minus {b}?|Calculate {a} - {b}.|{a} - {b} = ?|"
                   "Subtract {b} from {a}.",
             "zh": "{a}减{b}等于多少？|{a}-{b}等于几？|计算{a}-{b}。|{a}减去{b}是多少？"},
            "print({a} - {b})"),
    "div": ({"en": "What is {a} divided by {b}?|What is {a} / {b}?|Calculate {a} / {b}.|Divide {a} by {b}.",
             "zh": "{a}除以{b}等于多少？|{a}/{b}等于几？|计算{a}/{b}。|{a}除以{b}是多少？"},
            "print({a} / {b})"),
    "pow": ({"en": "What is {a} to the power of {b}?|What is {a} ** {b}?|Calculate {a}^{b}.|What is {a} raised to {b}?",
             "zh": "{a}的{b}次方是多少？|{a}的{b}次幂等于多少？|计算{a}的{b}次方。"},
            "print({a} ** {b})"),
    "sqrt": ({"en": "What is the square root of {a}?|Calculate the square root of {a}.|What's sqrt({a})?",
              "zh": "{a}的平方根是多少？|计算{a}的平方根。|{a}开平方是多少？"},
             "import math\nprint(math.sqrt({a}))"),
    "fact": ({"en": "What is {a} factorial?|What is {a}!?|Calculate the factorial of {a}.",
              "zh": "{a}的阶乘是多少？|计算{a}的阶乘。|{a}!等于多少？"},
             "import math\nprint(math.factorial({a}))"),
    "sum": ({"en": "What is the sum of {lw}?|Add up {lw}.|What do {lw} add up to?|Sum these numbers: {lc}.",
             "zh": "{lz}的和是多少？|求{lz}的总和。|把这些数加起来：{lc}。|{lz}加起来是多少？"},
            "print(sum({l}))"),
    "sort": ({"en": "Sort these numbers: {lc}.|Sort {lw} from smallest to largest.|Put {lw} in ascending order.",
              "zh": "把{lz}从小到大排序。|将这些数排序：{lc}。|请把{lz}按从小到大排列。"},
             "print(sorted({l}))"),
    "max": ({"en": "What is the largest of {lw}?|Which is the biggest number: {lc}?|Find the maximum of {lw}.",
             "zh": "{lz}中最大的是哪个？|{lz}里哪个数最大？|求{lz}的最大值。"},
            "print(max({l}))"),
    "min": ({"en": "What is the smallest of {lw}?|Which is the smallest number: {lc}?|Find the minimum of {lw}.",
             "zh": "{lz}中最小的是哪个？|{lz}里哪个数最小？|求{lz}的最小值。"},
            "print(min({l}))"),
    "mean": ({"en": "What is the average of {lw}?|Find the mean of {lw}.|What's the average of these numbers: {lc}?",
              "zh": "{lz}的平均数是多少？|求{lz}的平均值。|这些数的平均值是多少：{lc}？"},
             "x = {l}\nprint(sum(x) / len(x))"),
}
CODE_WEIGHTS = {"mul": 30, "add": 12, "sub": 10, "div": 6, "pow": 6, "sqrt": 4, "fact": 4, "sum": 8, "sort": 7,
                "max": 4, "min": 3, "mean": 4}

# Conversation kinds and counts: short chats (the original skills), long chats, tools, interpreter, drills of small
# sums and differences (a table the model must learn by heart), and repeat-after-me.
KIND_COUNTS = {"short": 8000, "long": 1800, "tools": 1800, "interpreter": 3000, "arith": 2500, "echo": 2500}
FOLLOWUPS = 1500


# ------------------------------------------------------------------ generators

def _surface(rng, q, lang, keep_case=False):
    # Vary how the user types, never what they ask (nor, with keep_case, the case of what a call copies).
    end = q[-1]
    if end in "?？" and rng.random() < 0.1:
        q = rng.choice(PREFIXES[lang]) + (q[0].lower() + q[1:] if lang == "en" and not keep_case else q)
    if lang == "en" and not keep_case:
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


def _short_conversation(rng):
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


def _arith_conversation(rng):
    lang = rng.choice(["en", "zh"])
    return [m for _ in range(rng.randint(1, 3)) for m in _turn(rng, lang, "arith")]


def _echo_conversation(rng):
    lang = rng.choice(["en", "zh"])
    msgs = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        items = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.45:
                items.append(str(_number(rng, 1, 6)) if rng.random() < 0.8 else str(round(rng.uniform(0, 1000), 2)))
            elif r < 0.7:
                items.append(rng.choice(CITIES)[lang == "zh"])
            elif r < 0.85:
                items.append(rng.choice(WORDS)[lang == "zh"])
            else:
                items.append(rng.choice(COPIED))
        text = rng.choice([" ", ", "] if lang == "en" else [" ", "、", "，"]).join(items)
        msgs += [{"role": "user", "content": rng.choice(ECHO_Q[lang].split("|")).format(s=text)},
                 {"role": "assistant", "content": text}]
    return msgs


def _number(rng, lo_digits=1, hi_digits=5) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)


def _words(xs, lang) -> str:
    s = [str(x) for x in xs]
    return ", ".join(s[:-1]) + " and " + s[-1] if lang == "en" else "、".join(s[:-1]) + "和" + s[-1]


def _code_task(rng, lang):
    """(question, code, printed output, answer) for work beyond what the model knows by heart."""
    kind = rng.choices(list(CODE_WEIGHTS), weights=list(CODE_WEIGHTS.values()))[0]
    questions, code = CODE_TASKS[kind]
    a, b, xs = _number(rng, 1, 4), _number(rng, 1, 4), [_number(rng, 1, 3) for _ in range(rng.randint(3, 7))]
    if kind == "mul" and rng.random() < 0.3:
        a, b = _number(rng, 2, 3), _number(rng, 2, 3)
    elif kind in ("add", "sub"):
        a, b = _number(rng, 2, 6), _number(rng, 1, 6)
    elif kind == "div":
        b = rng.randint(2, 999)
    elif kind == "pow":
        a, b = rng.randint(2, 30), rng.randint(2, 12)
    elif kind == "sqrt":
        a = rng.choice([_number(rng, 1, 5), rng.randint(2, 100) ** 2])
    elif kind == "fact":
        a = rng.randint(5, 20)
    env = {"math": math}
    code = code.format(a=a, b=b, l=xs)
    out = []
    exec(code, {**env, "print": lambda v: out.append(str(v))})  # our own code: the interpreter's printed line
    fields = dict(a=a, b=b, l=xs, lw=_words(xs, "en"), lz=_words(xs, "zh"), lc=", ".join(map(str, xs)), r=out[0])
    q = rng.choice(questions[lang].split("|")).format(**fields)
    return q, code, out[0], ANSWER[lang].format(r=out[0])


def _code_turn(rng, lang):
    q, code, out, a = _code_task(rng, lang)
    return [{"role": "user", "content": _surface(rng, q, lang)},
            {"role": "assistant", "metadata": "interpreter", "content": f"```python\n{code}\n```"},
            {"role": "observation", "content": f"```result\n{out}\n```"},
            {"role": "assistant", "content": a}]


def _call(rng, name: str, args: dict, result, question: str, answer: str, lang: str) -> list[dict]:
    return [{"role": "user", "content": _surface(rng, question, lang, keep_case=True)},
            {"role": "assistant", "metadata": name, "content": tool_call_code(args)},
            # learned too: its names and numbers repeat the call's, the plainest copying there is
            {"role": "observation", "content": json.dumps(result, ensure_ascii=False), "loss": True},
            {"role": "assistant", "content": answer}]


def _weather_turn(rng, lang, city=None, follow=False):
    en, zh = city or rng.choice(CITIES)
    c = en if lang == "en" else zh
    q = rng.choice((WEATHER_FOLLOW_Q if follow else WEATHER_Q)[lang].split("|")).format(c=c)
    if rng.random() < 0.07:
        return _call(rng, "get_weather", {"city": c}, {"error": f"no weather data for {c}"}, q,
                     WEATHER_ERR_A[lang].format(city=c), lang)
    # Random values, not the demo table's: the answer must be read from the observation.
    t, cond, h = rng.randint(-25, 42), rng.choice(list(CONDITIONS)), rng.randint(10, 99)
    cond = cond if lang == "en" else CONDITIONS[cond]  # as demo_tools.get_weather answers a Chinese name
    result = {"city": c, "temperature_c": t, "condition": cond, "humidity": h}
    a = WEATHER_A[lang].format(city=c, t=t, h=h, cond=cond)
    return _call(rng, "get_weather", {"city": c}, result, q, a, lang)


def _time_turn(rng, lang):
    when = datetime.datetime(2024, 1, 1) + datetime.timedelta(minutes=rng.randrange(3 * 365 * 24 * 60))
    result = {"date": when.strftime("%Y-%m-%d"), "time": when.strftime("%H:%M"), "weekday": when.strftime("%A")}
    weekday = result["weekday"] if lang == "en" else WEEKDAYS_ZH[result["weekday"]]
    a = TIME_A[lang].format(date=result["date"], time=result["time"], weekday=weekday)
    return _call(rng, "get_current_time", {}, result, rng.choice(TIME_Q[lang].split("|")), a, lang)


def _convert_turn(rng, lang):
    en_a, en_b, zh_a, zh_b = rng.choice(UNIT_PAIRS)
    ua, ub = (en_a, en_b) if lang == "en" else (zh_a, zh_b)
    v = rng.choice([_number(rng, 1, 4), round(rng.uniform(0, 100), 1)])
    result = demo_tools.convert_units(v, ua, ub)
    q = rng.choice(CONVERT_Q[lang].split("|")).format(v=v, a=ua, b=ub)
    a = CONVERT_A[lang].format(v=v, a=ua, b=ub, r=result["result"])
    return _call(rng, "convert_units", {"value": v, "from_unit": ua, "to_unit": ub}, result, q, a, lang)


def _random_turn(rng, lang):
    r = rng.random()
    if r < 0.2:
        q, args, lo, hi = rng.choice(DICE_Q[lang].split("|")), {"low": 1, "high": 6}, 1, 6
    elif r < 0.35:
        q, args, lo, hi = rng.choice(RANDOM_ANY_Q[lang].split("|")), {}, 1, 100
    else:
        lo = _number(rng, 1, 3)
        hi = lo + _number(rng, 1, 4) + 1
        q, args = rng.choice(RANDOM_Q[lang].split("|")).format(a=lo, b=hi), {"low": lo, "high": hi}
    n = rng.randint(lo, hi)
    return _call(rng, "random_number", args, {"number": n}, q, RANDOM_A[lang].format(n=n), lang)


TOOL_TURNS = {"get_weather": _weather_turn, "get_current_time": _time_turn, "convert_units": _convert_turn,
              "random_number": _random_turn}
# Weather and conversions copy names and numbers from the question; the other two copy nothing from it.
TOOL_WEIGHTS = {"get_weather": 4, "convert_units": 2, "get_current_time": 1, "random_number": 1}


def _tools_system(rng) -> tuple[dict, list[str]]:
    specs = demo_tool_specs()
    if rng.random() < 0.4:  # a subset, sometimes with tools it never needs, in any order
        specs = rng.sample(specs, rng.randint(1, len(specs))) + rng.sample(OTHER_TOOLS, rng.randint(0, 2))
        rng.shuffle(specs)
    if rng.random() < 0.3:  # registries differ in key order and detail: the model should not depend on them
        specs = [_vary_parameters(rng, s) for s in specs]
    names = [s["name"] for s in specs if s["name"] in TOOL_TURNS]
    return {"role": "system", "content": TOOLS_PROMPT, "tools": specs}, names


def _vary_parameters(rng, spec: dict) -> dict:
    """Each parameter as {"description"} (as in THUDM's tools_using_demo) or {"description", "type"}."""
    props = {}
    for k, v in spec["parameters"]["properties"].items():
        props[k] = {"description": v["description"]}
        if rng.random() >= 0.5:
            props[k]["type"] = v["type"]
    return {**spec, "parameters": {**spec["parameters"], "properties": props}}


def _plain_turn(rng, lang, intents=QUESTION_INTENTS):
    return _turn(rng, lang, rng.choice(intents))


def _tools_conversation(rng):
    lang = rng.choice(["en", "zh"])
    system, names = _tools_system(rng)
    msgs, last_city = [system], None
    # mostly several turns: the tools prompt is most of a conversation's tokens and none of what is learned
    for i in range(1 if rng.random() < 0.4 else rng.randint(2, 5)):
        r = rng.random()
        if i and r < 0.12:
            msgs += _turn(rng, lang, "thanks")
        elif r < 0.25:  # questions the tools don't answer still get the usual answers
            msgs += _plain_turn(rng, lang, ["identity", "fact", "arith", "weekday", "translate"] +
                                (["greeting"] if i == 0 else []))
        elif "get_weather" in names and last_city and r < 0.35:
            last_city = rng.choice(CITIES)
            msgs += _weather_turn(rng, lang, last_city, follow=True)
        elif "get_weather" in names and r < 0.4:  # no city: ask, then the user names one
            msgs += [{"role": "user", "content": _surface(rng, rng.choice(NO_CITY_Q[lang].split("|")), lang)},
                     {"role": "assistant", "content": NO_CITY_A[lang]}]
            last_city = rng.choice(CITIES)
            turn = _weather_turn(rng, lang, last_city)
            turn[0]["content"] = last_city[lang == "zh"]
            msgs += turn
        else:
            name = rng.choices(names, weights=[TOOL_WEIGHTS[n] for n in names])[0]
            if name == "get_weather":
                last_city = rng.choice(CITIES)
                msgs += _weather_turn(rng, lang, last_city)
            else:
                msgs += TOOL_TURNS[name](rng, lang)
    return msgs


def _interpreter_conversation(rng):
    lang = rng.choice(["en", "zh"])
    sys_lang = rng.choice(["en", "zh"])  # the prompt's language need not be the user's
    # the composite demo's folder, or a kernel's own as chatglm.chat.interpreter makes them (tempfile.mkdtemp)
    name = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=8))
    path = "/mnt/data/" if rng.random() < 0.2 else f"/tmp/chatglm-interpreter-{name}/work/"
    msgs = [{"role": "system", "content": INTERPRETER_SYSTEM[sys_lang].format(path=path)}]
    for i in range(1 if rng.random() < 0.5 else rng.randint(2, 5)):
        r = rng.random()
        if i and r < 0.12:
            msgs += _turn(rng, lang, "thanks")
        elif r < 0.25:
            msgs += _plain_turn(rng, lang, ["identity", "fact", "weekday", "translate", "how_are_you"] +
                                (["greeting"] if i == 0 else []))
        else:
            msgs += _code_turn(rng, lang)
    return msgs


def _capital_pair(rng, lang):
    """A capital question and a follow-up that names only the next country."""
    (c1, city1), (c2, city2) = [(x[0], x[1]) if lang == "en" else (x[2], x[3]) for x in rng.sample(CAPITALS, 2)]
    q1 = rng.choice(CAPITAL_Q[lang].split("|")).format(c=c1)
    q2 = rng.choice(CAPITAL_FOLLOW_Q[lang].split("|")).format(c=c2)
    return [{"role": "user", "content": _surface(rng, q1, lang)},
            {"role": "assistant", "content": CAPITAL_A[lang].format(c=c1, city=city1)},
            {"role": "user", "content": _surface(rng, q2, lang)},
            {"role": "assistant", "content": CAPITAL_A[lang].format(c=c2, city=city2)}]


def _long_conversation(rng):
    """Six to twelve turns that each get the answer they would get in a fresh chat."""
    lang = rng.choice(["en", "zh"])
    msgs = []
    if rng.random() < 0.15:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
    msgs += _turn(rng, lang, "greeting" if rng.random() < 0.4 else rng.choice(QUESTION_INTENTS))
    n = rng.randint(6, 12)
    while sum(m["role"] == "user" for m in msgs) < n - 1:
        if rng.random() < 0.03:
            lang = "zh" if lang == "en" else "en"
        r = rng.random()
        if r < 0.1:
            msgs += _turn(rng, lang, "thanks")
        elif r < 0.2:
            msgs += _capital_pair(rng, lang)
        else:
            msgs += _turn(rng, lang, rng.choice(QUESTION_INTENTS))
    msgs += _turn(rng, lang, rng.choice(["thanks", "goodbye"]))
    return msgs


def _followup_conversation(rng):
    """A capital question, one to three other questions, then a follow-up that names only a country ("And
    Germany?"): it asks for a capital because of the country, not because of the turn before it."""
    lang = rng.choice(["en", "zh"])
    msgs = _turn(rng, lang, "greeting") if rng.random() < 0.3 else []
    pair = _capital_pair(rng, lang)
    between = [m for _ in range(rng.randint(1, 3))
               for m in _turn(rng, lang, rng.choice(["arith", "arith", "weekday", "translate", "fact"]))]
    msgs += pair[:2] + between + pair[2:]
    if rng.random() < 0.5:
        msgs += _turn(rng, lang, rng.choice(QUESTION_INTENTS + ["thanks"]))
    return msgs


def followups(seed: int = 0, n: int = FOLLOWUPS) -> list[list[dict]]:
    """The conversations of the demo trainer's second phase (demo.train), made apart from conversations() so that
    the first phase's corpus, and the tokenizer trained on it, stay as they are."""
    rng = random.Random(seed + 1_000_003)
    return [_followup_conversation(rng) for _ in range(n)]


KINDS = {"short": _short_conversation, "long": _long_conversation, "tools": _tools_conversation,
         "interpreter": _interpreter_conversation, "arith": _arith_conversation, "echo": _echo_conversation}


def conversations(seed: int = 0) -> list[list[dict]]:
    """KIND_COUNTS conversations of each kind, interleaved in a fixed random order."""
    rng = random.Random(seed)
    kinds = [k for k, n in KIND_COUNTS.items() for _ in range(n)]
    rng.shuffle(kinds)
    return [KINDS[k](rng) for k in kinds]


def message_text(m: dict) -> str:
    """The text of a message as the model sees it (a system message's tools JSON included)."""
    parts = [m.get("metadata", ""), m["content"]]
    if "tools" in m:
        parts.append(json.dumps(m["tools"], indent=4, ensure_ascii=False))
    return "\n".join(p for p in parts if p)


def texts(seed: int = 0) -> list[str]:
    """Every message's text, for the tokenizer; each tools system message once (they repeat thousands of times)."""
    out = [message_text(m) for conv in conversations(seed) for m in conv]
    return list(dict.fromkeys(t for t in out if "\"parameters\"" in t)) + [t for t in out if "\"parameters\"" not in t]


if __name__ == "__main__":
    convs = conversations()
    all_texts = [message_text(m) for conv in convs for m in conv]
    dump = json.dumps(convs, ensure_ascii=False, sort_keys=True).encode("utf-8")
    turns = {}
    for conv in convs:
        n = sum(m["role"] == "user" for m in conv)
        turns[n] = turns.get(n, 0) + 1
    print(f"conversations: {len(convs)} ({', '.join(f'{k} {n}' for k, n in KIND_COUNTS.items())})")
    print(f"turns per conversation: {dict(sorted(turns.items()))}")
    print(f"tool calls: {sum(m.get('metadata', '') not in ('', 'interpreter') for c in convs for m in c)}, "
          f"code cells: {sum(m.get('metadata') == 'interpreter' for c in convs for m in c)}")
    print(f"messages: {len(all_texts)}, characters: {sum(map(len, all_texts))}, "
          f"unique texts: {len(dict.fromkeys(all_texts))}")
    print(f"json dump: {len(dump)} bytes, sha256 {hashlib.sha256(dump).hexdigest()}")
    for conv in convs[:: len(convs) // 6][:6]:
        print("---")
        for m in conv:
            tools = f" [tools: {', '.join(t['name'] for t in m['tools'])}]" if "tools" in m else ""
            print(f"{m['role']:>11}{' ' + m['metadata'] if m.get('metadata') else ''}: {m['content']}{tools}")
