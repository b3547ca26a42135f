#!/usr/bin/env python3
"""Renders the chat-template fixtures with Python's jinja2, set up the way transformers'
apply_chat_template sets it up, so the Swift interpreter can be held to the same bytes.

    python3 scripts/make_chat_template_fixtures.py

Reads Tests/Fixtures/chat_templates/templates/*.jinja and conversations.json, writes expected.json
there. Needs only jinja2 (>= 3.1); transformers itself is not imported: its environment is
rebuilt below from what transformers' chat_template_utils does:

- ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
  extension and a `{% generation %}` tag that renders its body unchanged;
- a `tojson` filter that is json.dumps(x, ensure_ascii=False, indent=indent,
  separators=separators, sort_keys=sort_keys), with no HTML escaping;
- globals raise_exception (a TemplateError carrying the message), strftime_now, dict, and a
  namespace that refuses underscore-prefixed attributes;
- messages lose their keys whose value is None, and a message with reasoning under
  reasoning_content, thinking or reasoning gets it under both `thinking` (first key) and
  `reasoning_content` (transformers 5 does this for gpt-oss-style templates);
- the template sees messages, tools (None when absent), documents (None),
  add_generation_prompt, bos_token, eos_token and any extra variables.

strftime_now reads a fixed clock (FIXED_NOW) so the output is reproducible; the Swift tests pass
the same moment.

expected.json holds, besides the renderings of each template on each conversation, "units"
(small templates, one construct each) and "random" (seeded random expressions and statement
mixes): jinja2's output for each, or the error it raised.
"""
import copy
import datetime
import json
import os
import sys

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "chat_templates")
FIXED_NOW = datetime.datetime(2024, 7, 26, 9, 5, 3)
BOS, EOS = "<|bos|>", "<|eos|>"


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant tokens;
    for rendering it is transparent."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class GuardedNamespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            GuardedNamespace.check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        GuardedNamespace.check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class DictGlobal:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: FIXED_NOW.strftime(fmt)
    env.globals["dict"] = DictGlobal()
    env.globals["namespace"] = GuardedNamespace
    return env


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def prepare(messages):
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(env, source, conversation):
    try:
        template = env.from_string(source)
        text = template.render(messages=prepare(conversation["messages"]), tools=conversation.get("tools"),
                               documents=None, add_generation_prompt=conversation["add_generation_prompt"],
                               bos_token=BOS, eos_token=EOS, **conversation.get("extra", {}))
        return {"output": text}
    except Exception as e:  # every failure is recorded: Swift must fail there too
        return {"error": str(e), "kind": type(e).__name__}


# Small templates, one construct each. The context is JSON; the expected text is jinja2's.
UNITS = [
    ("literal_text", "Hello, world!\n", {}),
    ("print_int_float", "{{ 1 }} {{ 1.0 }} {{ 2.50 }} {{ 1e3 }} {{ 1_000 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1.5e-7 }}", {}),
    ("print_bool_none", "{{ true }} {{ false }} {{ none }} {{ True }} {{ None }}", {}),
    ("print_list_dict", "{{ [1, 'a', none, true, 2.0] }} {{ {'k': 'v', 'n': [1]} }} {{ (1,) }} {{ (1, 'b') }} {{ () }}", {}),
    ("print_string_repr", "{{ ['it\\'s', \"say \\\"hi\\\"\", 'tab\\there', 'nl\\n', 'ü'] }}", {}),
    ("print_tuple_bare", "{{ 1, 2 }}", {}),
    ("string_escapes", "{{ 'a\\nb\\tc\\\\d\\'e\\u00e9\\x41' }}|{{ \"q\\\"\" }}|{{ 'x\\dy' }}", {}),
    ("string_concat_adjacent", "{{ 'a' 'b' \"c\" }}", {}),
    ("arithmetic", "{{ 7 + 3 }} {{ 7 - 10 }} {{ 7 * 3 }} {{ 7 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7.5 // 2 }} {{ 6 / 3 }}", {}),
    ("arithmetic_strings_lists", "{{ 'ab' + 'cd' }} {{ 'ab' * 3 }} {{ [1] + [2, 3] }} {{ [0] * 3 }} {{ 1 ~ 'x' ~ none ~ true }}", {}),
    ("unary", "{{ -3 }} {{ +3 }} {{ -(1 + 2) }} {{ - 1 | abs }} {{ not true }} {{ not none }}", {}),
    ("comparison", "{{ 1 == 1.0 }} {{ 1 != 2 }} {{ 1 < 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 2 >= 2 }} {{ true == 1 }} {{ none == none }} {{ 'a' == 'a' }} {{ [1] == [1] }}", {}),
    ("logic_values", "{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ '' and 'b' }} {{ none or [] }} {{ 1 and 0 }}", {}),
    ("in_operator", "{{ 'a' in 'cat' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'cat' }} {{ 'x' in undefined_thing }}", {}),
    ("ternary", "{{ 'yes' if x else 'no' }} {{ 'yes' if not x else 'no' }}|{{ 'only' if false }}|", {"x": True}),
    ("truthiness", "{% for v in [0, 1, '', 'a', [], [0], {}, {'a': 1}, none, 0.0] %}{{ 'T' if v else 'F' }}{% endfor %}", {}),
    ("attribute_and_item", "{{ d.a }} {{ d['a'] }} {{ d.b.c }} {{ d['b']['c'] }} {{ l[0] }} {{ l[-1] }} [{{ d.missing }}]", {"d": {"a": 1, "b": {"c": "deep"}}, "l": [10, 20, 30]}),
    ("dict_key_named_like_method", "{{ d['items'] }} {{ d.get('items') }} {{ d.keys() | list }}", {"d": {"items": "mine", "x": 1}}),
    ("slicing", "{{ s[1:3] }} {{ s[::-1] }} {{ s[-2:] }} {{ s[:2] }} {{ l[1:] }} {{ l[::2] }} {{ l[::-1] }} {{ l[5:] }} {{ s[::-2] }} {{ l[-10:2] }}", {"s": "hello", "l": [1, 2, 3, 4]}),
    ("string_index_unicode", "{{ s[0] }}{{ s[-1] }} {{ s | length }} {{ s[1:3] }}", {"s": "日本語😀"}),
    ("if_elif_else", "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %},{% endfor %}", {}),
    ("for_loop_vars", "{% for x in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}", {}),
    ("for_prev_next", "{% for x in [1, 2, 3] %}[{{ loop.previtem }}|{{ loop.nextitem }}]{% endfor %}", {}),
    ("for_cycle", "{% for x in range(5) %}{{ loop.cycle('odd', 'even') }} {% endfor %}", {}),
    ("for_else", "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}|{% for x in [1] %}{{ x }}{% else %}empty{% endfor %}", {}),
    ("for_filter", "{% for x in range(10) if x is even %}{{ x }}{{ ',' if not loop.last }}{% endfor %}", {}),
    ("for_unpack_items", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}", {"d": {"z": 1, "a": 2}}),
    ("for_dict_iterates_keys", "{% for k in d %}{{ k }}{% endfor %}", {"d": {"x": 1, "y": 2}}),
    ("for_string_iterates_chars", "{% for c in 'héllo' %}{{ c }}.{% endfor %}", {}),
    ("for_filtered_iterable", "{% for m in msgs | selectattr('role', 'equalto', 'user') %}{{ m.content }}{% endfor %}", {"msgs": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}, {"role": "user", "content": "c"}]}),
    ("for_nested_loop", "{% for a in [1, 2] %}{% for b in [3, 4] %}{{ loop.index }}{{ a * b }} {% endfor %}{{ loop.index }}|{% endfor %}", {}),
    ("loop_break_continue", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("loop_scope_set", "{% set count = 0 %}{% for i in range(3) %}{% set count = count + 1 %}{{ count }}{% endfor %}|{{ count }}", {}),
    ("if_scope_set", "{% if true %}{% set y = 5 %}{% endif %}{{ y }}", {}),
    ("namespace", "{% set ns = namespace(total=0, seen=false) %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }} {{ ns.seen }}", {}),
    ("namespace_empty", "{% set ns = namespace() %}{% set ns.x = 'v' %}{{ ns.x }}", {}),
    ("set_tuple", "{% set a, b = 1, 2 %}{{ a }}{{ b }}", {}),
    ("set_block", "{% set body %}Hello {{ name }}!{% endset %}[{{ body }}]", {"name": "Ann"}),
    ("set_block_filter", "{% set body | upper %}shout {{ 1 + 1 }}{% endset %}{{ body }}", {}),
    ("macro_basic", "{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!{% endmacro %}{{ greet('Bob') }} {{ greet('Al', greeting='Hi') }} {{ greet(name='Cy', greeting='Yo') }}", {}),
    ("macro_varargs_kwargs", "{% macro m(a) %}{{ a }}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, x=4) }}", {}),
    ("macro_call_caller", "{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold {{ 1 + 1 }}{% endcall %}", {}),
    ("macro_call_with_args", "{% macro each(items) %}{% for i in items %}{{ caller(i) }}{% endfor %}{% endmacro %}{% call(x) each([1, 2]) %}<{{ x }}>{% endcall %}", {}),
    ("macro_recursion", "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * (fact(n - 1) | int) }}{% endif %}{% endmacro %}{{ fact(5) }}", {}),
    ("macro_sees_globals", "{% macro m() %}{{ bos_token }}{{ top }}{% endmacro %}{% set top = 'T' %}{{ m() }}", {"bos_token": "<s>"}),
    ("filter_block", "{% filter upper %}abc {{ 'def' }}{% endfilter %}", {}),
    ("with_block", "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a }}", {}),
    ("raw_block", "{% raw %}{{ not parsed }} {% if %}{% endraw %}", {}),
    ("comments", "a{# comment #}b{#- trimmed -#}  c", {}),
    ("whitespace_control", "<  {{- 'x' -}}  >\n  {%- if true -%}  y  {%- endif -%}  \n<", {}),
    ("trim_blocks", "{% if true %}\nline\n{% endif %}\nafter\n", {}),
    ("lstrip_blocks", "start\n    {% if true %}\n    indented\n    {% endif %}\n  {{ 'var' }}\nend", {}),
    ("lstrip_plus_sign", "a\n    {%+ if true %}x{% endif %}\n", {}),
    ("lstrip_comment", "a\n   {# c #}\nb", {}),
    ("trailing_newline_dropped", "text\n", {}),
    ("crlf_newlines", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\n", {}),
    ("filter_trim", "[{{ '  x y \\n' | trim }}] [{{ 'xxhixx' | trim('x') }}]", {}),
    ("filter_tojson", "{{ d | tojson }}|{{ d | tojson(indent=2) }}|{{ 'a<b>&\\'' | tojson }}|{{ [] | tojson(indent=2) }}|{{ {} | tojson(indent=2) }}", {"d": {"b": [1, 2.5, True, None, "é"], "a": {"x": "y\n"}}}),
    ("filter_tojson_options", "{{ d | tojson(sort_keys=true) }}|{{ d | tojson(separators=(',', ':')) }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ d | tojson(indent='\\t') }}", {"d": {"b": 1, "a": [1, 2]}}),
    ("filter_tojson_floats", "{{ [1.0, 0.5, 1e20, 1e-5, 123456789.125, 3] | tojson }}", {}),
    ("filter_length_count", "{{ 'abc' | length }} {{ [1, 2] | count }} {{ {'a': 1} | length }} {{ nothing | length }}", {}),
    ("filter_join", "{{ [1, 2, 3] | join(', ') }} {{ ['a', 'b'] | join }} {{ items | join('/', attribute='n') }}", {"items": [{"n": "x"}, {"n": "y"}]}),
    ("filter_case", "{{ 'hello wORLD' | upper }} {{ 'HeLLo' | lower }} {{ 'hello wORLD-foo bar_baz' | title }} {{ 'hello World' | capitalize }}", {}),
    ("filter_default", "{{ missing | default('dflt') }} {{ '' | default('empty') }} {{ '' | default('empty', true) }} {{ none | default('n') }} {{ none | d('n', boolean=true) }} {{ 0 | default(5) }}", {}),
    ("filter_first_last", "{{ [3, 4, 5] | first }} {{ [3, 4, 5] | last }} {{ 'abc' | first }} {{ 'abc' | last }}", {}),
    ("filter_list", "{{ 'abc' | list }} {{ {'a': 1, 'b': 2} | list }} {{ range(3) | list }}", {}),
    ("filter_items", "{% for k, v in {'x': 1, 'y': [2]} | items %}{{ k }}:{{ v }} {% endfor %}", {}),
    ("filter_selectattr_rejectattr", "{{ users | selectattr('admin') | map(attribute='name') | join(',') }} {{ users | rejectattr('admin') | map(attribute='name') | join(',') }} {{ users | selectattr('age', 'gt', 30) | map(attribute='name') | list }} {{ users | selectattr('nick', 'defined') | list | length }}", {"users": [{"name": "a", "admin": True, "age": 40}, {"name": "b", "admin": False, "age": 20, "nick": "bb"}, {"name": "c", "admin": True, "age": 31}]}),
    ("filter_select_reject", "{{ [1, 2, 3, 4, 5] | select('odd') | list }} {{ [1, 2, 3, 4] | reject('even') | list }} {{ [0, 1, '', 'a'] | select | list }}", {}),
    ("filter_map", "{{ ['a', 'B'] | map('upper') | join }} {{ [1.5, 2.5] | map('int') | list }} {{ items | map(attribute='x', default='?') | list }} {{ [' a ', 'b '] | map('trim') | list }}", {"items": [{"x": 1}, {}]}),
    ("filter_replace", "{{ 'aaa' | replace('a', 'b') }} {{ 'aaa' | replace('a', 'b', 2) }} {{ 'hello' | replace('', '-') }}", {}),
    ("filter_int_float_string", "{{ '42' | int }} {{ '4.7' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} {{ 3.9 | int }} {{ '3' | float }} {{ 2 | float }} {{ 'y' | float }} {{ 12 | string }} {{ [1] | string }} {{ '0x1A' | int(0, 16) }} {{ true | int }}", {}),
    ("filter_indent", "{{ 'a\\nb\\n\\nc' | indent }}|{{ 'a\\nb' | indent(2, true) }}|{{ 'a\\n\\nb' | indent(2, blank=true) }}|{{ 'x\\n' | indent(first=true) }}", {}),
    ("filter_escape_safe", "{{ '<a href=\"x\">&\\'</a>' | e }} {{ '<b>' | escape }} {{ '<b>' | safe }}", {}),
    ("filter_abs_round", "{{ -3 | abs }} {{ -2.5 | abs }} {{ 2.567 | round(2) }} {{ 2.5 | round }} {{ 3.5 | round }} {{ 2.1 | round(0, 'ceil') }} {{ 2.9 | round(method='floor') }} {{ 7 | round }}", {}),
    ("filter_unique_reverse", "{{ [1, 2, 1, 3, 2] | unique | list }} {{ ['a', 'A', 'b'] | unique | list }} {{ [1, 2, 3] | reverse | list }} {{ 'abc' | reverse }}", {}),
    ("filter_sort", "{{ [3, 1, 2] | sort }} {{ [3, 1, 2] | sort(reverse=true) }} {{ ['b', 'A', 'c'] | sort }} {{ ['b', 'A', 'c'] | sort(case_sensitive=true) }} {{ users | sort(attribute='age') | map(attribute='n') | list }}", {"users": [{"n": "x", "age": 3}, {"n": "y", "age": 1}]}),
    ("filter_dictsort", "{{ {'b': 1, 'a': 2, 'C': 0} | dictsort }} {{ {'b': 1, 'a': 2} | dictsort(by='value') }} {{ {'b': 1, 'a': 2} | dictsort(reverse=true) }}", {}),
    ("filter_batch", "{{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ [1, 2, 3] | batch(2, 'x') | list }}", {}),
    ("filter_wordcount_center", "{{ 'one two  three' | wordcount }} [{{ 'ab' | center(7) }}]", {}),
    ("filter_sum_min_max", "{{ [1, 2, 3] | sum }} {{ items | sum(attribute='v') }} {{ [1, 2] | sum(start=10) }} {{ [3, 1, 2] | min }} {{ [3, 1, 2] | max }} {{ ['b', 'A'] | min }} {{ items | max(attribute='v') }}", {"items": [{"v": 1}, {"v": 5}]}),
    ("filter_striptags", "{{ '<p>Hello   <b>world</b></p>' | striptags }}", {}),
    ("filter_chained_args", "{{ messages | map(attribute='role') | unique | list | length }}", {"messages": [{"role": "a"}, {"role": "b"}, {"role": "a"}]}),
    ("tests_types", "{% for v in [1, 1.5, 'a', [1], {'a': 1}, none, true] %}{{ v is number }}{{ v is integer }}{{ v is float }}{{ v is string }}{{ v is mapping }}{{ v is iterable }}{{ v is sequence }}{{ v is none }}{{ v is boolean }}|{% endfor %}", {}),
    ("tests_defined", "{{ x is defined }} {{ y is defined }} {{ y is undefined }} {{ x is not none }} {{ d.k is defined }} {{ d.z is defined }}", {"x": 1, "d": {"k": None}}),
    ("tests_values", "{{ true is true }} {{ 1 is true }} {{ false is false }} {{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }} {{ 'a' is in 'abc' }} {{ 2 is in [1, 2] }}", {}),
    ("tests_comparison", "{{ 1 is eq 1 }} {{ 1 is equalto 2 }} {{ 1 is ne 2 }} {{ 1 is lt 2 }} {{ 3 is gt 2 }} {{ 2 is ge 2 }} {{ 2 is le 1 }}", {}),
    ("tests_misc", "{{ none is sameas none }} {{ range is callable }} {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 'aBc' is lower }} {{ x is callable }}", {"x": 1}),
    ("is_not", "{{ 1 is not string }} {{ 'a' is not string }} {{ x is not defined }}", {}),
    ("string_methods_strip", "[{{ s.strip() }}] [{{ s.lstrip() }}] [{{ s.rstrip() }}] [{{ 'xxaxx'.strip('x') }}] [{{ '--a'.lstrip('-') }}] [{{ 'a\\n\\n'.rstrip('\\n') }}]", {"s": "  pad  "}),
    ("string_methods_split", "{{ 'a,b,,c'.split(',') }} {{ ' a  b '.split() }} {{ 'a b c'.split(' ', 1) }} {{ 'a-b-c'.rsplit('-', 1) }} {{ 'l1\\nl2\\r\\nl3'.splitlines() }} {{ ''.split(',') }}", {}),
    ("string_methods_misc", "{{ 'abc'.startswith('ab') }} {{ 'abc'.endswith(('x', 'c')) }} {{ 'a-b'.replace('-', '+') }} {{ 'abc'.upper() }} {{ 'ABC'.lower() }} {{ 'hi there'.title() }} {{ 'hi There'.capitalize() }} {{ 'abcb'.find('b') }} {{ 'abcb'.rfind('b') }} {{ 'abcb'.find('z') }} {{ 'abcb'.count('b') }} {{ ','.join(['a', 'b']) }} {{ 'abc'.index('c') }}", {}),
    ("string_method_format", "{{ '{} and {}'.format('a', 1) }} {{ '{0}{1}{0}'.format('x', 'y') }} {{ '{name}!'.format(name='Z') }} {{ '{:>4}|{:<3}|{:^5}'.format('a', 'b', 'c') }} {{ '{:.2f}'.format(3.14159) }} {{ '{{literal}}'.format() }}", {}),
    ("string_methods_more", "{{ 'abc'.isdigit() }} {{ '123'.isdigit() }} {{ 'ab'.isalpha() }} {{ 'a b'.isspace() }} {{ 'x'.center(5, '*') }} {{ 'ab'.ljust(4, '.') }} {{ 'ab'.rjust(4) }} {{ '7'.zfill(3) }} {{ 'a:b:c'.partition(':') }} {{ 'HeLLo'.swapcase() }} {{ 'abc'.removeprefix('a') }} {{ 'abc'.removesuffix('c') }} {{ 'Ab'.casefold() }}", {}),
    ("dict_methods", "{{ d.get('a') }} {{ d.get('z') }} {{ d.get('z', 'dflt') }} {{ d.keys() | list }} {{ d.values() | list }} {{ d.items() | list }} {{ d | length }}", {"d": {"a": 1, "b": 2}}),
    ("globals_range", "{{ range(3) | list }} {{ range(1, 4) | list }} {{ range(10, 0, -3) | list }} {{ range(0) | list }}", {}),
    ("globals_dict", "{{ dict(a=1, b='x') }} {{ dict(a=1)['a'] }}", {}),
    ("globals_strftime", "{{ strftime_now('%Y-%m-%d %H:%M:%S') }} {{ strftime_now('%d %B %Y') }} {{ strftime_now('%b %d, %A %a %j %y %I %p') }}", {}),
    ("raise_exception", "before{{ raise_exception('Custom failure: ' ~ 42) }}after", {}),
    ("raise_exception_in_branch", "{% if x %}{{ raise_exception('x not allowed') }}{% endif %}ok", {"x": False}),
    ("undefined_behaviour", "[{{ nope }}] [{{ nope | string }}] {{ nope is defined }} [{% for x in nope %}{{ x }}{% endfor %}] {{ 'T' if nope else 'F' }} {{ nope == nope }} [{{ nope ~ 'x' }}]", {}),
    ("undefined_attribute_error", "{{ nope.attr }}", {}),
    ("undefined_missing_key_chain_error", "{{ d.missing.deeper }}", {"d": {}}),
    ("none_attribute_is_undefined", "[{{ d.a.b }}]", {"d": {"a": None}}),
    ("type_error_add", "{{ 'a' + 1 }}", {}),
    ("division_by_zero", "{{ 1 / 0 }}", {}),
    ("call_undefined_error", "{{ nothing() }}", {}),
    ("list_append_rejected", "{% set l = [] %}{{ l.append(1) }}", {}),
    ("namespace_underscore_rejected", "{% set ns = namespace(_x=1) %}", {}),
    ("number_formats", "{{ 3.0 * 2 }} {{ 10 / 4 }} {{ 1e16 }} {{ 1e15 }} {{ 123456789012345678 }} {{ 0.0001 }} {{ 0.00001 }} {{ -0.0 }} {{ 2 ** 62 }}", {}),
    ("json_numbers", "{{ n }} {{ f }} {{ n / 2 }} {{ f is float }} {{ n is integer }} {{ big }}", {"n": 3, "f": 2.5, "big": 12345678901}),
    ("message_content_parts", "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %};{% endfor %}", {"messages": [{"content": "plain"}, {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
    ("loop_in_macro_with_loop_var", "{% macro m(xs) %}{% for x in xs %}{{ loop.index }}{% endfor %}{% endmacro %}{% for y in [1] %}{{ m([5, 6]) }}{{ loop.index }}{% endfor %}", {}),
    ("generation_tag", "{% generation %}inside {{ 1 }}{% endgeneration %}", {}),
    ("filter_on_expression_precedence", "{{ 'a' ~ 'b' | upper }} {{ ('a' ~ 'b') | upper }} {{ 1 ~ 2 | string }} {{ -2 ** 2 }} {{ not 1 == 2 }}", {}),
    ("dict_literal_access", "{% set names = {'assistant': 'A', 'user': 'U'} %}{{ names.user }}{{ names['assistant'] }}", {}),
    ("tuple_literal_membership", "{{ 'x' in ('x', 'y') }} {{ ('a', 1)[1] }}", {}),
    ("string_multiplication_and_format", "{{ '=' * 5 }} {{ '%s-%d' % ('a', 3) }}", {}),
    ("filter_title_apostrophe", "{{ \"they're bill's friends\" | title }}", {}),
    ("nested_data_repr", "{{ {'a': [1, {'b': none}], 'c': (1, 2)} }} {{ {'q': \"it's\"} }}", {}),
    ("float_repr_specials", "{{ 1.0e100 }} {{ 2.5e-10 }} {{ 100.0 }} {{ 1234567.0 }}", {}),
    ("map_tojson", "{{ tools | map('tojson') | join('\\n') }}", {"tools": [{"name": "a", "x": [1]}, {"name": "b"}]}),
    ("loop_length_with_filter", "{% for x in [1, 2, 3, 4] if x > 1 %}{{ loop.length }}{{ loop.last }} {% endfor %}", {}),
    ("set_in_macro_local", "{% set v = 'outer' %}{% macro m() %}{% set v = 'inner' %}{{ v }}{% endmacro %}{{ m() }} {{ v }}", {}),
    ("iterator_semantics", "{{ 'T' if ([] | select) else 'F' }} {{ [1, 2] | map('string') | list }} {{ ([1, 2] | select | first) }} [{{ ([1] | select)[0] }}] {{ none | map('upper') | list }} {{ 0 | selectattr('x') | list }} {{ {'a': 1} | items | list }}", {}),
    ("iterator_has_no_length", "{{ [1, 2] | select | length }}", {}),
    ("iterator_not_json", "{{ [1, 2] | map('string') | tojson }}", {}),
    ("iterator_reverse_last", "{{ [1, 2, 3] | reverse | list }} {{ [1, 2, 3] | reverse | first }}", {}),
    ("markup_semantics", "{{ '<a>' | safe + '<b>' }} {{ '<a>' + '<b>' | safe }} {{ '<a>' | e + '<b>' | e }} {{ ('<a>' | safe) ~ '<b>' }} {{ '<a>' | e | e }} {{ '<a>' | safe | length }} {{ ('<' | safe) == '<' }} {{ ('x' | safe) is string }} {{ '<a>' | safe | string + '<' }}", {}),
    ("markup_times", "{{ ('<' | safe) * 2 + '<' }}", {}),
    ("unknown_filter_in_untaken_if", "{% if false %}{{ x | nosuchfilter }}{% elif false %}{{ x is nosuchtest }}{% endif %}ok {{ x | nosuchfilter if false else 'inline' }}", {}),
    ("unknown_filter_in_taken_if", "{% if true %}{{ x | nosuchfilter }}{% endif %}", {}),
    ("unknown_filter_in_loop_inside_if", "{% if false %}{% for y in [] %}{{ y | nosuchfilter }}{% endfor %}{% endif %}", {}),
    ("undefined_chain_strict", "{{ d.a.b is defined }}", {"d": {}}),
    ("none_printing", "{{ none | string }}|{{ none ~ '' }}|{{ [none] }}|{{ none | default('x') }}|{{ missing | default(none) }}", {}),
    ("whitespace_mixed", "  {% if true %}\n  a\n  {%- endif %}\n\t{% if true %}\tb{% endif %}\n{{- 'c' }}  {{ 'd' -}}  \n\n {# note #} e", {}),
    ("whitespace_block_at_start", "   {% if true %}x{% endif %}   \n{% for i in [1, 2] %}\n  {{ i }}\n{% endfor %}\ny", {}),
    ("whitespace_not_line_start", "a {% if true %}b{% endif %} c\n", {}),
    ("whitespace_trailing_strip", "x {%- if true -%} \n\n y \n {%- endif -%}\n\n", {}),
    ("whitespace_comment_trim", "a\n{# comment #}\nb\n  {#- c -#}  \nd", {}),
    ("raw_keeps_newline", "{% raw %}\n{{ x }}\n{% endraw %}\nafter", {}),
    ("macro_default_from_param", "{% macro m(a, b=a * 2) %}{{ a }},{{ b }}{% endmacro %}{{ m(3) }} {{ m(3, 4) }} {{ m(b=1, a=2) }}", {}),
    ("macro_too_many_args", "{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }}", {}),
    ("macro_unknown_kwarg", "{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, b=2) }}", {}),
    ("macro_missing_arg", "{% macro m(a, b) %}[{{ a }}|{{ b }}]{% endmacro %}{{ m(1) }}", {}),
    ("macro_modifies_namespace", "{% set ns = namespace(n=0) %}{% macro bump() %}{% set ns.n = ns.n + 1 %}{% endmacro %}{{ bump() }}{{ bump() }}{{ ns.n }}", {}),
    ("loop_changed_cycle_nested", "{% for a in [1, 1, 2] %}{{ loop.changed(a) }}{% for b in 'xy' %}{{ loop.cycle('-', '+') }}{% endfor %}{% endfor %}", {}),
    ("integer_float_ops", "{{ 10 // -3 }} {{ -10 % 3 }} {{ 10 % -3 }} {{ 2 ** 0.5 }} {{ 7.0 // 2 }} {{ -7.5 // 2 }} {{ 5 % 2.5 }} {{ 1 / 3 }} {{ 2 / 3 }} {{ 0.1 * 3 }} {{ 123456789.0 * 10 }} {{ 1e-7 }} {{ 3 * 1.0 }} {{ true + 1 }} {{ 4 ** 0 }}", {}),
    ("string_repr_quotes", "{{ ['a\"b\\'c', '\\x01', '\\u200b', '\\xa0', '😀', '\\x7f', 'é'] }}", {}),
    ("tojson_escapes", "{{ ['\\x01\\x7f\\u2028', '😀é', '\\\\/\"'] | tojson }} {{ ['😀é\\x7f'] | tojson(ensure_ascii=true) }} {{ {1: 'a', none: 'b', true: 'c', 2.5: 'd'} | tojson }} {{ {'a': [], 'b': {}, 'c': [{}]} | tojson(indent=2) }} {{ (1, 'x') | tojson }} {{ 'm' | safe | tojson }} {{ 3.0 | tojson }} {{ {'b': 1, 'a': 2} | tojson(indent=0) }}", {}),
    ("dict_method_names", "{{ d['values'] }} {{ d.values() | list }} {{ d.keys | string | length > 0 }}", {"d": {"values": "mine"}}),
    ("comparison_errors", "{{ 'a' < 1 }}", {}),
    ("case_filters_unicode", "{{ 'straße' | upper }} {{ 'ÑAND' | capitalize }} {{ 'ΑΒΓ' | lower }} {{ 'éclair au café' | title }}", {}),
    ("trim_unicode", "[{{ '\\u3000x\\xa0' | trim }}] {{ 'a\\u3000b'.split() }}", {}),
    ("wordcount_punctuation", "{{ \"hello, world! it's 42_x\" | wordcount }}", {}),
    ("int_float_parsing", "{{ '  42  ' | int }} {{ '4_2' | int }} {{ '1e3' | int }} {{ '-0x1A' | int(0, 16) }} {{ '0b101' | int(0, 0) }} {{ '1_000.5' | float }} {{ ' 2.5 ' | float }} {{ 'nan' | float }} {{ none | int }} {{ '' | int(-1) }}", {}),
    ("round_more", "{{ 2.675 | round(2) }} {{ 2.675 | round(1) }} {{ -2.5 | round }} {{ 1234.5678 | round(-2) }} {{ 0.5 | round }} {{ 1.5 | round }}", {}),
    ("aggregates_more", "{{ [] | min }}|{{ [0.5, 1] | sum }}|{{ [1, 2, 3, 4, 5] | slice(2) | list }}|{{ {'B': 1, 'a': 2} | dictsort(true) }}|{{ items | unique(attribute='k') | list }}|{{ ['x', 'y'] | batch(3, '-') | list }}", {"items": [{"k": 1, "v": "a"}, {"k": 1, "v": "b"}, {"k": 2, "v": "c"}]}),
    ("string_methods_edge", "{{ 'a b  c'.split(None, 1) }} {{ ' a b '.rsplit() }} {{ 'x\\ny\\n'.splitlines(true) }} {{ 'x'.startswith('') }} {{ 'abc'.startswith('b', 1) }} {{ 'abc'.endswith('b', 0, 2) }} {{ 'aaa'.count('a', 1) }} {{ 'abc'.find('c', -1) }} {{ ''.join([]) }}|{{ 'ab'.strip('') }}", {}),
    ("str_format_specs", "{{ '{:,}'.format(1234567) }} {{ '{0:08.3f}'.format(3.14159) }} {{ '{:+d}'.format(5) }} {{ '{:x}'.format(255) }} {{ '{!r}'.format('q') }} {{ '{a[0]}-{b.k}'.format(a=[7], b={'k': 'v'}) }} {{ '{:*^9}'.format('mid') }} {{ '{:e}'.format(12345.678) }} {{ '{:.3}'.format(3.14159) }} {{ '{:5}|{:<5}|'.format(1, 2) }}", {}),
    ("percent_format", "{{ '%5s|%-5s|%05d|%.1f|%x|%r' % ('a', 'b', 42, 2.25, 255, 'q') }} {{ '%d%%' % 50 }} {{ '%(name)s!' % {'name': 'Z'} }} {{ '%s' % [1, 2] }}", {}),
    ("format_filter", "{{ '%s and %s' | format('a', 'b') }} {{ '%.2f' | format(3.14159) }}", {}),
    ("set_with_filters_and_tests", "{% set x = missing | default('z') | upper %}{{ x }}{% set y = (x is string) and x | length %}{{ y }}", {}),
    ("nested_ternaries", "{{ 'a' if 1 > 2 else 'b' if 2 > 3 else 'c' }} {{ ('x' if true else 'y') | upper }} {{ 1 if none is none }}", {}),
    ("chained_comparison", "{{ 1 < 2 < 3 }} {{ 1 < 3 < 2 }} {{ 1 == 1 != 2 }} {{ 'a' in 'abc' in 'xabcx' }}", {}),
    ("for_over_string_and_tuple_unpack_error", "{% for a, b in [[1, 2, 3]] %}{{ a }}{% endfor %}", {}),
    ("for_over_none_error", "{% for x in none %}{{ x }}{% endfor %}", {}),
    ("loop_vars_after_filter_and_break", "{% for x in range(6) if x % 2 %}{{ loop.index }}/{{ loop.length }}{% if loop.index == 2 %}{% break %}{% endif %} {% else %}never{% endfor %}", {}),
    ("attribute_of_int_index", "{{ l.0 }} {{ l.1.name }} {{ t[1] }}", {"l": ["a", {"name": "n"}], "t": ["x", "y"]}),
    ("namespace_attribute_read_item", "{% set ns = namespace(a=1) %}{{ ns.a }} {{ ns['a'] }} {{ ns.missing is defined }}", {}),
    ("dict_global_and_literal_equality", "{{ dict(a=1) == {'a': 1} }} {{ {'a': 1, 'b': 2} == {'b': 2, 'a': 1} }} {{ [1, 2] == (1, 2) }} {{ 1 == 1.0 == true }}", {}),
    ("string_slicing_steps", "{{ 'abcdef'[1:5:2] }} {{ 'abcdef'[5:1:-2] }} {{ 'abcdef'[-1:-4:-1] }} {{ [1, 2, 3][10:] }} {{ 'abc'[::-1][0] }}", {}),
    ("content_list_join", "{{ content | map(attribute='text') | join('\\n') }}", {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
    ("big_ints", "{{ 9007199254740993 }} {{ 2 ** 62 + 2 ** 61 }} {{ -9223372036854775807 - 1 }}", {}),
    ("found_by_differential_fuzzing", "{{ 78 | round(-2) }} {{ 250 | round(-2) }} {{ -151 | round(-2) }} [{{ [1, 2][] }}] {{ '<p>a<br>b<!-- c -->d</p> &amp;&#39;&#x41;' | striptags }} {{ '' % [1, 2] }}|{{ 'x' % nothing }} {{ none | map('nosuchfilter') | list }} {{ '% d|%+d|%-4d|' % (5, 5, 5) }}", {}),
    ("inline_if_not_allowed_in_if_statement", "{% if a if b %}x{% endif %}", {}),
    ("test_argument_count", "{{ 1 is number(2) }}", {}),
    ("method_argument_count", "{{ 'a'.upper(1) }}", {}),
    ("lazy_generators", "{{ 'T' if (5 | unique) else 'F' }} {{ ({'a': 1} | select('odd')) is iterable }} {{ 1e3 | items | int }} {{ [1, 2] | map('string') | reverse }}", {}),
    ("items_of_none_fails_when_walked", "{{ none | items | list }}", {}),
    ("lazy_generator_fails_when_walked", "{{ 5 | unique | list }}", {}),
    ("float_divmod", "{{ 0 % -3.75 }} {{ 1 // 0.1 }} {{ -0.0 // 1 }} {{ 5.5 % -2 }} {{ -1 % 0.3 }} {{ 1 % 0.1 }} {{ -7 // 2.0 }}", {}),
    ("slices_of_constants", "[{{ 10[:1] }}] [{{ {}[:2] | join }}] {{ [1, 2, 3][1:] }}", {}),
    ("slice_of_int_value_error", "{{ n[:1] }}", {"n": 5}),
    ("truncate", "{{ [1, 2] | truncate(5) }} [{{ missing | truncate }}] {{ 'abcdefghijklmnopqrstuvwxyz' | truncate(10) }} {{ 'hello world foo bar baz qux' | truncate(12) }} {{ 'hello world foo bar baz qux' | truncate(12, true) }} {{ 'abcdefghijklmnop' | truncate(10, true, '!', 0) }}", {}),
    ("indent_needs_a_string", "{{ 5 | indent }}", {}),
    ("int_of_undefined_fails", "{{ missing | int }}", {}),
    ("for_else_scope", "{% set y = 0 %}{% for x in [] %}{% else %}{% set y = 1 %}{{ y }}{% endfor %}[{{ y }}]{% filter upper %}{% set q = 1 %}{% endfilter %}[{{ q }}]", {}),
    ("dict_views", "{{ d.keys() }} {{ d.items() }} {{ d.values() | list }} {{ d.keys() is sequence }} {{ d.items() | length }} {{ 'a' in d.keys() }} [{{ d.keys()[0] }}] {{ d.keys() == {'b': 0, 'a': 0}.keys() }} {% for k, v in d.items() %}{{ k }}{{ v }}{% endfor %}", {"d": {"a": 1, "b": [2]}}),
    ("integer_literal_forms", "{{ 0x1F }} {{ 0o17 }} {{ 0b101 }} {{ 1_000_000 }} {{ 0 }} {{ 0_0 }} {{ 0xff_ff }} {{ 1.5e3 }} {{ 007.5 }}", {}),
    ("leading_zero_integer_error", "{{ 07 }}", {}),
    ("striptags_entities", "{{ 'a &amp b &lt;&gt &quot;x&quot; &#65&#x42; &apos; &apos &nbsp;|' | striptags }}", {}),
    ("unknown_filter_parse_error", "{{ x | frobnicate }}", {}),
    ("unknown_tag_parse_error", "{% frobnicate %}", {}),
    ("unknown_test_parse_error", "{{ x is frobnicated }}", {}),
    ("unclosed_block_error", "{% if true %}never closed", {}),
    ("unclosed_variable_error", "{{ x ", {}),
    ("bad_expression_error", "{{ 1 + }}", {}),
    ("mismatched_end_error", "{% for x in y %}{% endif %}", {}),
    ("break_outside_loop_error", "{% break %}", {}),
]


# Random templates, seeded, for differential checks beyond the hand-written cases: expressions
# over a fixed context, and statement soups that mix whitespace control with every block tag.
RANDOM_CONTEXT = {"s": "Hello, Wörld! 😀 <b>x</b> 'q' \"dq\"", "n": 7, "f": 2.5, "l": [3, 1, 2, "a", None],
                  "d": {"b": 2, "a": 1, "k": [1, {"z": None}]}, "e": "", "u": "  spaced  text\n",
                  "nested": [[1, 2], [3, 4]], "zero": 0, "neg": -3.75,
                  "msgs": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": " yo ", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]}


def random_expression(rng, depth=0):
    strs = ["'a'", "''", "'abc'", "'A b C'", "'  x  '", "'é😀'", "'\\n'", "'1,2,3'", "'it\\'s'", "'%s'", "'{}'", "'<&>'", "'42'", "'3.5'"]
    nums = ["0", "1", "2", "-1", "3", "10", "0.5", "1.0", "2.75", "1e3", "7"]
    names = ["s", "n", "f", "l", "d", "e", "u", "nested", "msgs", "missing", "zero", "neg"]
    filters = ["trim", "length", "upper", "lower", "title", "capitalize", "first", "last", "list", "string", "int", "float",
               "abs", "round", "unique | list", "reverse | list", "sort", "dictsort", "wordcount", "sum", "min", "max", "tojson",
               "e", "striptags", "items | list", "center(9)", "indent(2, true)", "join(', ')", "replace('a', 'b')",
               "default('dflt')", "default('x', true)", "selectattr('role') | list", "map(attribute='role') | list",
               "map('string') | join", "select('odd') | list", "reject('none') | list", "batch(2) | list",
               "sort(reverse=true)", "tojson(indent=2)", "tojson(sort_keys=true)", "round(1)", "int(5)", "truncate(5)"]
    tests = ["defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence",
             "boolean", "odd", "even", "lower", "upper"]
    methods = ["strip()", "upper()", "split()", "split(',')", "startswith('a')", "endswith('c')", "replace('a', 'b')",
               "find('b')", "count('a')", "title()", "splitlines()", "format(1)", "join(['x', 'y'])"]
    k = rng.randrange(10)
    if k < 4:
        e = rng.choice(names)
    elif k < 7:
        e = rng.choice(strs)
    elif k < 9:
        e = rng.choice(nums + ["none", "true", "false"])
    elif depth < 2:
        e = "[" + ", ".join(random_expression(rng, depth + 1) for _ in range(rng.randrange(3))) + "]"
    else:
        e = rng.choice(names)
    for _ in range(rng.randrange(3)):
        k = rng.randrange(10)
        if k == 0:
            e += "[" + rng.choice(["0", "-1", "'a'", "'role'", "1:", "::-1", ":2"]) + "]"
        elif k == 1:
            e += "." + rng.choice(["role", "content", "a", "k", "tool_calls"])
        elif k == 2:
            e += "." + rng.choice(methods)
        elif k == 3:
            e += "." + rng.choice(["get('a')", "items() | list", "keys() | list", "get('z', 0)"])
        elif k < 8:
            e += " | " + rng.choice(filters)
        else:
            e += " is " + rng.choice(["", "not "]) + rng.choice(tests)
    if depth < 3 and rng.random() < 0.4:
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", ">=", "in", "not in", "and", "or"])
        e = "(" + e + ") " + op + " (" + random_expression(rng, depth + 1) + ")"
    if depth < 2 and rng.random() < 0.1:
        e = "(" + e + ") if (" + random_expression(rng, depth + 1) + ") else (" + random_expression(rng, depth + 1) + ")"
    return e


def random_statements(rng, depth=0):
    def pick(*options):
        return rng.choice(options)
    exprs = ["1", "'s'", "name", "items | length", "d.a", "loop.index if loop is defined else 0", "x if x is defined else 'nx'",
             "ns.v", "flag and 'T'", "name | upper", "d | tojson", "caller() if caller is defined else ''", "y | default('dy')"]
    def bo(): return pick("{%", "{%", "{%-", "{%+")
    def bc(): return pick("%}", "%}", "-%}", "+%}")
    def vo(): return pick("{{", "{{", "{{-")
    def vc(): return pick("}}", "}}", "-}}")
    parts = []
    for _ in range(rng.randrange(1, 4)):
        parts.append(pick("", "", " ", "  ", "\n", "\n  ", "\t", " \n", "\n\n", "text\n", "\n    "))
        k = rng.randrange(11) if depth < 2 else 0
        if k < 3:
            parts.append(vo() + " " + rng.choice(exprs) + " " + vc())
        elif k == 3:
            parts.append(bo() + " if " + pick("flag", "not flag", "x is defined") + " " + bc() + random_statements(rng, depth + 1)
                         + (bo() + " else " + bc() + random_statements(rng, depth + 1) if rng.random() < 0.4 else "")
                         + bo() + " endif " + bc())
        elif k == 4:
            parts.append(bo() + " for x in " + pick("items", "d", "'ab'", "[]") + " " + bc() + random_statements(rng, depth + 1)
                         + (bo() + " else " + bc() + random_statements(rng, depth + 1) if rng.random() < 0.3 else "")
                         + bo() + " endfor " + bc())
        elif k == 5:
            parts.append(bo() + " set " + pick("y", "ns.v") + " = " + rng.choice(exprs) + " " + bc())
        elif k == 6:
            parts.append(pick("{#", "{#-") + pick(" c ", "\n") + pick("#}", "-#}"))
        elif k == 7:
            parts.append(bo() + " macro mm(a, b='B') " + bc() + random_statements(rng, depth + 1) + bo() + " endmacro " + bc()
                         + vo() + " mm(1) " + vc())
        elif k == 8:
            parts.append(bo() + " call wrap() " + bc() + random_statements(rng, depth + 1) + bo() + " endcall " + bc())
        elif k == 9:
            parts.append(bo() + " filter upper " + bc() + random_statements(rng, depth + 1) + bo() + " endfilter " + bc())
        else:
            parts.append(bo() + " set z " + bc() + random_statements(rng, depth + 1) + bo() + " endset " + bc() + "[{{ z }}]")
    return "".join(parts)


def random_cases(env):
    """Returns the contexts, by name, and the cases, each naming its context."""
    import random
    rng = random.Random(20240726)
    contexts = {"expressions": RANDOM_CONTEXT,
                "statements": {"items": [1, 2, 3], "d": {"a": 1, "b": [1, 2]}, "name": "Zoë", "flag": True}}
    cases = [("{{ " + random_expression(rng) + " }}", "expressions") for _ in range(250)]
    for _ in range(60):
        source = ("{% set ns = namespace(v=0) %}{% macro wrap() %}<{{ caller() }}>{% endmacro %}"
                  + random_statements(rng) + rng.choice(["", "\n", "\n\n"]))
        cases.append((source, "statements"))
    out = []
    for source, context in cases:
        entry = {"template": source, "context": context}
        try:
            entry["output"] = env.from_string(source).render(**copy.deepcopy(contexts[context]))
        except Exception as e:
            entry["error"] = str(e)
            entry["kind"] = type(e).__name__
        out.append(entry)
    return {"contexts": contexts, "cases": out}

def main():
    env = environment()
    tdir = os.path.join(ROOT, "templates")
    conversations = json.load(open(os.path.join(ROOT, "conversations.json"), encoding="utf-8"))
    templates = {}
    for name in sorted(os.listdir(tdir)):
        if not name.endswith(".jinja"):
            continue
        source = open(os.path.join(tdir, name), encoding="utf-8", newline="").read()
        templates[name[:-len(".jinja")]] = {c["id"]: render(env, source, c) for c in conversations}
    units = []
    for name, source, context in UNITS:
        entry = {"name": name, "template": source, "context": context}
        try:
            entry["output"] = env.from_string(source).render(**context)
        except Exception as e:
            entry["error"] = str(e)
            entry["kind"] = type(e).__name__
        units.append(entry)
    out = {"bos_token": BOS, "eos_token": EOS, "now": FIXED_NOW.isoformat(), "templates": templates, "units": units,
           "random": random_cases(env)}
    with open(os.path.join(ROOT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
        f.write("\n")
    ok = sum(1 for t in templates.values() for r in t.values() if "output" in r)
    print(f"{len(templates)} templates, {ok} renderings, "
          f"{sum(1 for t in templates.values() for r in t.values()) - ok} errors; {len(units)} unit cases",
          file=sys.stderr)


if __name__ == "__main__":
    main()
