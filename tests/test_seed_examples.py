"""The seed document's section 1 code blocks, with local model paths in place of hub names."""

import numpy as np
import pytest


def test_seed_encoder_example(minilm_dir):
    from retrievals import AutoModelForEmbedding

    model = AutoModelForEmbedding.from_pretrained(minilm_dir, pooling_method='mean')
    sentences = [
        '* Moka 此文本嵌入模型由 MokaAI 训练并开源，训练脚本使用 uniem',
        '* Massive 此文本嵌入模型通过**千万级**的中文句对数据集进行训练',
        '* Mixed 此文本嵌入模型支持中英双语的同质文本相似度计算，异质文本检索等功能，未来还会支持代码检索，ALL in one'
    ]
    embeddings = model.encode(sentences)
    assert embeddings.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings[1], model.encode(sentences[1]), atol=2e-3)


@pytest.mark.slow
def test_seed_llm_example_shape(smollm_gguf):
    from retrievals import AutoModelForEmbedding

    model_name = smollm_gguf
    model = AutoModelForEmbedding.from_pretrained(
                model_name,
                pooling_method='last',
                use_fp16=True,
                query_instruction='Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: ',
                document_instruction='',
            )
    queries = ['how much protein should a female eat', 'summit define']
    documents = [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams "
        "per day. But, as you can see from this chart, you'll need to increase that if you're expecting or "
        "training for a marathon.",
        "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a "
        "mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or "
        "more governments.",
    ]
    scores = (model.encode_queries(queries) @ model.encode_corpus(documents).T) * 100
    assert scores.shape == (2, 2)
    assert np.all(scores <= 100.01) and np.all(scores > -100.01)
    np.testing.assert_allclose(scores, model.similarity(model.encode_queries(queries),
                                                        model.encode_corpus(documents)) * 100, atol=1e-3)
