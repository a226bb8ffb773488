-- GPT-2's byte-level BPE in SQL: the ids tiktoken gives (tests/test_tokenizer.py checks them on whole corpora)
SELECT llm_encode('Hello world');
SELECT llm_encode(' To be, or not to be: that is the question.');
SELECT llm_encode('naïve café — 東京 🙂  tabs	and
newlines');
SELECT llm_encode('');
SELECT llm_decode('{15496,995}');
SELECT llm_decode(llm_encode('naïve café — 東京 🙂')) = 'naïve café — 東京 🙂' AS round_trip;
SELECT * FROM llm_tokenize('Hello, world!');
