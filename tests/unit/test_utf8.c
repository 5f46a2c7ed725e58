/* test_utf8.c - strict UTF-8 and escaped untrusted bytes (util/utf8.h). */
#include <string.h>

#include "test.h"
#include "util/utf8.h"

#define U(s) (const unsigned char *)(s), sizeof(s) - 1

DS4_TEST(utf8_char_is_strict) {
    CHECK_EQ_INT(ds4_utf8_char(U("a")), 1);
    CHECK_EQ_INT(ds4_utf8_char(U("\xc3\xa9")), 2);          /* é */
    CHECK_EQ_INT(ds4_utf8_char(U("\xe2\x82\xac")), 3);      /* € */
    CHECK_EQ_INT(ds4_utf8_char(U("\xf0\x9f\x98\x80")), 4);  /* U+1F600 */
    CHECK_EQ_INT(ds4_utf8_char(U("\xf4\x8f\xbf\xbf")), 4);  /* U+10FFFF, the last */
    CHECK_EQ_INT(ds4_utf8_char((const unsigned char *)"\0", 1), 1);
    /* overlongs, surrogates, past U+10FFFF, stray continuation, cut short, bad lead bytes */
    const char *bad[] = {"\xc0\x80", "\xc1\xbf", "\xe0\x80\xaf", "\xf0\x80\x80\xaf", "\xed\xa0\x80", "\xed\xbf\xbf",
                         "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\x80", "\xbf", "\xe2\x82", "\xf8\x88\x80\x80\x80",
                         "\xff", "\xc3\x28", NULL};
    for (int i = 0; bad[i]; i++) CHECK_EQ_INT(ds4_utf8_char((const unsigned char *)bad[i], strlen(bad[i])), 0);
    CHECK_EQ_INT(ds4_utf8_char(U("\xc3\xa9") - 1), 0); /* n cuts it short */
    CHECK_EQ_INT(ds4_utf8_char((const unsigned char *)"x", 0), 0);
}

DS4_TEST(utf8_escaped_keeps_text_and_escapes_the_rest) {
    char b[64];
    CHECK(!strcmp(ds4_escaped(b, sizeof b, "deepseek4", 9, 0), "deepseek4"));
    CHECK(!strcmp(ds4_escaped(b, sizeof b, "d\xff" "e", 3, 0), "d\\xffe"));
    CHECK(!strcmp(ds4_escaped(b, sizeof b, "\xc0\x80|\xed\xa0\x80", 6, 0), "\\xc0\\x80|\\xed\\xa0\\x80"));
    CHECK(!strcmp(ds4_escaped(b, sizeof b, "caf\xc3\xa9\n\t\\", 8, 0), "caf\xc3\xa9\\x0a\\x09\\\\"));
    CHECK(!strcmp(ds4_escaped(b, sizeof b, "abcdef", 6, 3), "abc..."));
    /* a small buffer: cut at a whole character, "..." and the NUL always fit */
    char s[8];
    CHECK(!strcmp(ds4_escaped(s, sizeof s, "\xff\xff\xff", 3, 0), "\\xff..."));
    CHECK(!strcmp(ds4_escaped(s, sizeof s, "abcdefghij", 10, 0), "abcd..."));
    CHECK(strlen(ds4_escaped(s, sizeof s, "\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac", 9, 0)) < sizeof s);
}
