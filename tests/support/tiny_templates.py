"""Chat templates and tokenizer training text for the tiny test models.

Kept apart from ``tinymodels.py`` so the builder stays readable; everything
here is an immutable string.
"""

from __future__ import annotations

# ChatML in the spirit of Qwen2.5: tools go into the system turn inside
# <tools></tools>, calls are JSON inside <tool_call></tool_call>, tool results
# are folded into a user turn as <tool_response> blocks.  The template
# mentions ``tool_call.name`` on purpose: mlx_lm infers its "json_tools"
# parser from "<tool_call>" plus that phrase, which is what real Qwen2.5
# checkpoints get.  ``reasoning_content``/``thinking`` on assistant turns and
# ``enable_thinking=false`` are understood so thinking tests have something
# to render; with neither present the output matches plain Qwen2.5 shape.
CHATML_TEMPLATE = r"""
{%- set default_system = "You are a helpful assistant." -%}
{%- if messages and messages[0].role == "system" -%}
    {%- set system_text = messages[0].content -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = default_system -%}
    {%- set rest = messages -%}
{%- endif -%}
{%- if tools -%}
    {{- "<|im_start|>system\n" + system_text + "\n\n# Tools\n\n" -}}
    {{- "You may call one or more functions to help with the user query.\n\n" -}}
    {{- "The available function signatures are inside <tools></tools> XML tags:\n<tools>" -}}
    {%- for tool in tools -%}
        {{- "\n" + (tool | tojson) -}}
    {%- endfor -%}
    {{- "\n</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments inside <tool_call></tool_call> XML tags:\n" -}}
    {{- "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" -}}
{%- else -%}
    {{- "<|im_start|>system\n" + system_text + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in rest -%}
    {%- if message.role == "user" or message.role == "system" -%}
        {{- "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n" -}}
    {%- elif message.role == "assistant" -%}
        {{- "<|im_start|>assistant\n" -}}
        {%- set reasoning = message.reasoning_content or message.thinking -%}
        {%- if reasoning -%}
            {{- "<think>\n" + reasoning + "\n</think>\n\n" -}}
        {%- endif -%}
        {%- if message.content -%}
            {{- message.content -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- if call.function is defined -%}
                    {%- set tool_call = call.function -%}
                {%- else -%}
                    {%- set tool_call = call -%}
                {%- endif -%}
                {%- if message.content or not loop.first -%}
                    {{- "\n" -}}
                {%- endif -%}
                {{- "<tool_call>\n{\"name\": \"" + tool_call.name + "\", \"arguments\": " -}}
                {%- if tool_call.arguments is string -%}
                    {{- tool_call.arguments -}}
                {%- else -%}
                    {{- tool_call.arguments | tojson -}}
                {%- endif -%}
                {{- "}\n</tool_call>" -}}
            {%- endfor -%}
        {%- endif -%}
        {{- "<|im_end|>\n" -}}
    {%- elif message.role == "tool" -%}
        {%- if loop.first or loop.previtem.role != "tool" -%}
            {{- "<|im_start|>user" -}}
        {%- endif -%}
        {{- "\n<tool_response>\n" + message.content + "\n</tool_response>" -}}
        {%- if loop.last or loop.nextitem.role != "tool" -%}
            {{- "<|im_end|>\n" -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- "<think>\n\n</think>\n\n" -}}
    {%- endif -%}
{%- endif -%}
"""

# Llama 3.1 family: header tokens around the role, <|eot_id|> closing each
# turn, tools described in the system turn, calls as bare JSON with
# "parameters", and results under the "ipython" role.  No <tool_call> marker,
# so mlx_lm infers no tool parser: a second, genuinely different family.
LLAMA3_TEMPLATE = r"""
{{- bos_token -}}
{%- if messages and messages[0].role == "system" -%}
    {%- set system_text = messages[0].content -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = "" -%}
    {%- set rest = messages -%}
{%- endif -%}
{%- if system_text or tools -%}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" -}}
    {%- if tools -%}
        {{- "Environment: ipython\n\n" -}}
    {%- endif -%}
    {{- system_text -}}
    {%- if tools -%}
        {{- "\n\nYou can call these functions. To call one, reply with JSON of the form " -}}
        {{- "{\"name\": function name, \"parameters\": object of argument names and values}.\n\n" -}}
        {%- for tool in tools -%}
            {{- (tool | tojson(indent=4)) + "\n\n" -}}
        {%- endfor -%}
    {%- endif -%}
    {{- "<|eot_id|>" -}}
{%- endif -%}
{%- for message in rest -%}
    {%- if message.role == "assistant" and message.tool_calls -%}
        {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" -}}
        {%- for call in message.tool_calls -%}
            {%- if call.function is defined -%}
                {%- set tool_call = call.function -%}
            {%- else -%}
                {%- set tool_call = call -%}
            {%- endif -%}
            {%- if not loop.first -%}
                {{- "\n" -}}
            {%- endif -%}
            {{- "{\"name\": \"" + tool_call.name + "\", \"parameters\": " -}}
            {%- if tool_call.arguments is string -%}
                {{- tool_call.arguments -}}
            {%- else -%}
                {{- tool_call.arguments | tojson -}}
            {%- endif -%}
            {{- "}" -}}
        {%- endfor -%}
        {{- "<|eot_id|>" -}}
    {%- elif message.role == "tool" or message.role == "ipython" -%}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" -}}
    {%- else -%}
        {{- "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" + (message.content or "") + "<|eot_id|>" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" -}}
{%- endif -%}
"""

# Enough varied English for a ~512-entry byte-level BPE to learn useful
# merges; digits, punctuation, JSON and code-ish text are included so numbers
# and tool-call payloads tokenize into more than single bytes.
TRAINING_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of 1000 miles begins
with a single step, and the first step is often the hardest one to take.
On Monday, 3 March 2025, the weather in Paris was 14 degrees with light rain;
by Friday it had climbed to 21 degrees and the streets were full of people.
"Where are you going?" she asked. "To the market, then the library," he said.
The assistant answered every question politely, explaining the reasons for
each answer and pointing out mistakes when the user made them.

Numbers appear everywhere: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256,
512, 1024, 2048, 3.14159, 2.71828, -7, +12, 50%, $19.99, #1, 24/7, 9:30 am.
Lists help: first, second, third; apples, oranges, and pears. Questions end
with a question mark? Exclamations end with a bang! Ellipses trail off...

In the beginning the server loaded the model, read the configuration and
waited for requests. Each request named a model, a prompt and some options
such as temperature, top_p, num_predict and stop sequences. The server
streamed tokens back as soon as they were generated, one line of JSON at a
time, and finished with a summary of how long the work had taken.

{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}}
{"name": "add", "arguments": {"a": 2, "b": 3}} returns {"result": 5}.
def add(a: int, b: int) -> int:
    return a + b

for i in range(10):
    print(i * i)

People like to talk about the weather, food, music, books, travel and their
families. Some prefer mountains, others the sea. Good writing is clear and
short; good code is simple and well tested. Time flies like an arrow, while
fruit flies like a banana. She sells sea shells by the sea shore.
"""
