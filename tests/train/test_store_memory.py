

def test_queries_before_answer_keeps_the_question_and_drops_the_answers_readers():
    """selection_before_answer's mask: the query predicting the first answer token selects;
    the ones whose input is an answer token (and all after) do not; no weights: None."""
    import torch

    from train.store_memory import queries_before_answer
    from train.windows import pack_targets

    t = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])
    w = torch.tensor([[1, 1, 30, 30, 1, 1], [1, 1, 1, 1, 1, 30]])
    keep = queries_before_answer(pack_targets(t, w))
    assert keep.tolist() == [[True, True, True, False, False, False], [True] * 6]
    assert queries_before_answer(pack_targets(t, torch.ones_like(t))) is None


def test_answer_rows_are_the_queries_reading_and_predicting_answer_tokens():
    """answer_token_selection's rows: input and target both answer tokens (the answer's
    second token on, as decode steps write them); none without weights or answers; capped."""
    import torch

    from train.store_memory import MAX_TOKEN_ROWS, answer_rows
    from train.windows import pack_targets

    t = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])
    w = torch.tensor([[1, 1, 30, 30, 30, 1], [1, 1, 1, 1, 1, 30]])
    rows = answer_rows(pack_targets(t, w))
    assert rows[0].tolist() == [3, 4] and rows[1] is None
    assert answer_rows(pack_targets(t, torch.ones_like(t))) == [None, None]
    long = answer_rows(pack_targets(torch.ones(1, 100, dtype=torch.long), torch.full((1, 100), 30)))
    assert long[0].tolist() == list(range(1, 1 + MAX_TOKEN_ROWS))
