"""Demo tools for ChatGLM3 tool calling: `chatglm chat --tools chatglm/demo/tools.py`.

Plain typed functions: the docstring is the tool's description, `Annotated[type, "description"]` describes a
parameter, a default makes it optional. The bundled demo model is trained on conversations that call exactly
these tools (chatglm/demo/corpus.py), so they are its tools out of the box.
"""
import datetime
import random
from typing import Annotated

__all__ = ["get_weather", "get_current_time", "convert_units", "random_number"]

# A fixed table, not live data: city -> (temperature in °C, condition, humidity in %). Chinese names are aliases.
WEATHER = {
    "Beijing": (3, "sunny", 30), "Shanghai": (12, "cloudy", 70), "Guangzhou": (22, "rainy", 85),
    "Shenzhen": (23, "cloudy", 80), "Hangzhou": (10, "rainy", 75), "Chengdu": (9, "foggy", 88),
    "Wuhan": (8, "cloudy", 65), "Xi'an": (4, "sunny", 40), "Harbin": (-15, "snowy", 60),
    "Hong Kong": (21, "sunny", 72), "Tokyo": (11, "sunny", 50), "Seoul": (2, "windy", 45),
    "Singapore": (30, "stormy", 90), "New Delhi": (24, "sunny", 35), "Paris": (8, "rainy", 82),
    "London": (7, "foggy", 87), "Berlin": (2, "cloudy", 76), "Rome": (14, "sunny", 60),
    "Madrid": (12, "windy", 55), "Moscow": (-8, "snowy", 79), "New York": (5, "windy", 58),
    "San Francisco": (14, "foggy", 78), "Sydney": (26, "sunny", 52), "Cairo": (21, "sunny", 38),
}
CITY_ZH = {
    "北京": "Beijing", "上海": "Shanghai", "广州": "Guangzhou", "深圳": "Shenzhen", "杭州": "Hangzhou",
    "成都": "Chengdu", "武汉": "Wuhan", "西安": "Xi'an", "哈尔滨": "Harbin", "香港": "Hong Kong", "东京": "Tokyo",
    "首尔": "Seoul", "新加坡": "Singapore", "新德里": "New Delhi", "巴黎": "Paris", "伦敦": "London",
    "柏林": "Berlin", "罗马": "Rome", "马德里": "Madrid", "莫斯科": "Moscow", "纽约": "New York",
    "旧金山": "San Francisco", "悉尼": "Sydney", "开罗": "Cairo",
}
# Asked by a Chinese name, the table answers in Chinese, as a localized weather service would.
CONDITION_ZH = {"sunny": "晴天", "cloudy": "多云", "rainy": "下雨", "snowy": "下雪", "foggy": "有雾", "windy": "刮风",
                "stormy": "有雷暴", "overcast": "阴天"}

# unit -> (dimension, factor to the base unit); temperatures are converted separately.
UNITS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254), "yd": ("length", 0.9144),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784),
    "c": ("temperature", None), "f": ("temperature", None), "k": ("temperature", None),
}
UNIT_ALIASES = {
    "meter": "m", "meters": "m", "metre": "m", "metres": "m", "kilometer": "km", "kilometers": "km",
    "centimeter": "cm", "centimeters": "cm", "millimeter": "mm", "millimeters": "mm", "mile": "mi", "miles": "mi",
    "foot": "ft", "feet": "ft", "inch": "in", "inches": "in", "yard": "yd", "yards": "yd",
    "kilogram": "kg", "kilograms": "kg", "gram": "g", "grams": "g", "pound": "lb", "pounds": "lb", "lbs": "lb",
    "ounce": "oz", "ounces": "oz", "liter": "l", "liters": "l", "litre": "l", "litres": "l", "milliliter": "ml",
    "milliliters": "ml", "gallon": "gal", "gallons": "gal", "celsius": "c", "°c": "c", "fahrenheit": "f",
    "°f": "f", "kelvin": "k",
    "米": "m", "公里": "km", "千米": "km", "厘米": "cm", "毫米": "mm", "英里": "mi", "英尺": "ft", "英寸": "in",
    "码": "yd", "千克": "kg", "公斤": "kg", "克": "g", "磅": "lb", "盎司": "oz", "升": "l", "毫升": "ml",
    "加仑": "gal", "摄氏度": "c", "华氏度": "f", "开尔文": "k",
}


def get_weather(city: Annotated[str, "the city, e.g. Paris or 北京"]) -> dict:
    """Get the current weather in a city (from a fixed demo table, not live data)."""
    city = city.strip()
    name = CITY_ZH.get(city, city)
    match = next((c for c in WEATHER if c.lower() == name.lower()), None)
    if match is None:
        return {"error": f"no weather data for {city}"}
    temperature, condition, humidity = WEATHER[match]
    if city in CITY_ZH:
        condition = CONDITION_ZH[condition]
    return {"city": city, "temperature_c": temperature, "condition": condition, "humidity": humidity}


def get_current_time() -> dict:
    """Get the current local date and time."""
    now = datetime.datetime.now()
    return {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H:%M"), "weekday": now.strftime("%A")}


def _unit(text: str) -> str:
    u = text.strip().lower()
    u = UNIT_ALIASES.get(u, u)
    if u not in UNITS:
        raise ValueError(f"unknown unit {text!r}")
    return u


def _to_celsius(v: float, u: str) -> float:
    return {"c": v, "f": (v - 32) * 5 / 9, "k": v - 273.15}[u]


def convert_units(value: Annotated[float, "the amount to convert"],
                  from_unit: Annotated[str, "the unit of the amount, e.g. km, lb, celsius"],
                  to_unit: Annotated[str, "the unit to convert to, e.g. mi, kg, fahrenheit"]) -> dict:
    """Convert an amount between units of length, mass, volume or temperature."""
    a, b = _unit(from_unit), _unit(to_unit)
    if UNITS[a][0] != UNITS[b][0]:
        raise ValueError(f"cannot convert {UNITS[a][0]} ({from_unit}) to {UNITS[b][0]} ({to_unit})")
    if UNITS[a][0] == "temperature":
        c = _to_celsius(value, a)
        result = {"c": c, "f": c * 9 / 5 + 32, "k": c + 273.15}[b]
    else:
        result = value * UNITS[a][1] / UNITS[b][1]
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": round(result, 4)}


def random_number(low: Annotated[int, "the smallest number"] = 1,
                  high: Annotated[int, "the largest number"] = 100) -> dict:
    """Draw a random whole number between low and high (inclusive)."""
    if low > high:
        raise ValueError(f"low ({low}) is greater than high ({high})")
    return {"number": random.randint(low, high)}
