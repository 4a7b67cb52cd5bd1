//! The synthetic world the curriculum talks about: bilingual entities with checkable facts.

/// An animal and its facts, in English and Chinese.
pub struct Animal {
    pub en: &'static str,
    pub zh: &'static str,
    pub legs: u32,
    pub sound_en: &'static str,
    pub food_en: &'static str,
    pub food_zh: &'static str,
    pub home_en: &'static str,
    pub home_zh: &'static str,
}

// One table row per animal; named fields would triple the table.
#[allow(clippy::too_many_arguments)]
const fn animal(
    en: &'static str,
    zh: &'static str,
    legs: u32,
    sound_en: &'static str,
    food_en: &'static str,
    food_zh: &'static str,
    home_en: &'static str,
    home_zh: &'static str,
) -> Animal {
    Animal {
        en,
        zh,
        legs,
        sound_en,
        food_en,
        food_zh,
        home_en,
        home_zh,
    }
}

// One line per animal: a table reads down its columns.
#[rustfmt::skip]
pub const ANIMALS: [Animal; 40] = [
    animal("cat", "猫", 4, "meow", "fish", "鱼", "house", "房子"),
    animal("dog", "狗", 4, "woof", "meat", "肉", "house", "房子"),
    animal("cow", "牛", 4, "moo", "grass", "草", "farm", "农场"),
    animal("duck", "鸭子", 2, "quack", "seeds", "种子", "pond", "池塘"),
    animal("sheep", "羊", 4, "baa", "grass", "草", "farm", "农场"),
    animal("owl", "猫头鹰", 2, "hoot", "mice", "老鼠", "forest", "森林"),
    animal("horse", "马", 4, "neigh", "hay", "干草", "stable", "马厩"),
    animal("chicken", "鸡", 2, "cluck", "corn", "玉米", "farm", "农场"),
    animal("frog", "青蛙", 4, "croak", "insects", "虫子", "pond", "池塘"),
    animal("spider", "蜘蛛", 8, "hiss", "flies", "苍蝇", "web", "网"),
    animal("pig", "猪", 4, "oink", "corn", "玉米", "farm", "农场"),
    animal("bee", "蜜蜂", 6, "buzz", "nectar", "花蜜", "hive", "蜂巢"),
    animal("lion", "狮子", 4, "roar", "meat", "肉", "savanna", "草原"),
    animal("goose", "鹅", 2, "honk", "grass", "草", "lake", "湖"),
    animal("mouse", "老鼠", 4, "squeak", "cheese", "奶酪", "hole", "洞"),
    animal("crab", "螃蟹", 10, "click", "fish", "鱼", "beach", "海滩"),
    animal("wolf", "狼", 4, "howl", "meat", "肉", "forest", "森林"),
    animal("parrot", "鹦鹉", 2, "squawk", "fruit", "水果", "tree", "树"),
    animal("deer", "鹿", 4, "bellow", "acorns", "橡子", "wood", "树林"),
    animal("termite", "白蚁", 6, "tap", "wood", "木头", "mound", "土堆"),
    animal("bear", "熊", 4, "growl", "honey", "蜂蜜", "cave", "山洞"),
    animal("dolphin", "海豚", 0, "click", "fish", "鱼", "sea", "大海"),
    animal("rabbit", "兔子", 4, "thump", "carrots", "胡萝卜", "burrow", "地洞"),
    animal("eagle", "老鹰", 2, "screech", "fish", "鱼", "cliff", "悬崖"),
    animal("monkey", "猴子", 4, "chatter", "bananas", "香蕉", "jungle", "丛林"),
    animal("octopus", "章鱼", 8, "blub", "shrimp", "虾", "sea", "大海"),
    animal("donkey", "驴", 4, "bray", "hay", "干草", "farm", "农场"),
    animal("butterfly", "蝴蝶", 6, "flutter", "nectar", "花蜜", "garden", "花园"),
    animal("tiger", "老虎", 4, "roar", "meat", "肉", "jungle", "丛林"),
    animal("hedgehog", "刺猬", 4, "snuffle", "worms", "蚯蚓", "hedge", "树篱"),
    animal("squirrel", "松鼠", 4, "chirp", "nuts", "坚果", "tree", "树"),
    animal("ladybird", "瓢虫", 6, "hum", "aphids", "蚜虫", "leaf", "叶子"),
    animal("camel", "骆驼", 4, "grunt", "thorns", "荆棘", "desert", "沙漠"),
    animal("whale", "鲸鱼", 0, "sing", "krill", "磷虾", "ocean", "海洋"),
    animal("elephant", "大象", 4, "trumpet", "grass", "草", "savanna", "草原"),
    animal("ostrich", "鸵鸟", 2, "boom", "plants", "植物", "savanna", "草原"),
    animal("lobster", "龙虾", 10, "click", "clams", "蛤蜊", "sea", "大海"),
    animal("koala", "考拉", 4, "grunt", "eucalyptus", "桉树叶", "tree", "树"),
    animal("crow", "乌鸦", 2, "caw", "berries", "浆果", "nest", "鸟巢"),
    animal("fox", "狐狸", 4, "yip", "mice", "老鼠", "den", "窝"),
];

pub struct Country {
    pub en: &'static str,
    pub zh: &'static str,
    pub capital_en: &'static str,
    pub capital_zh: &'static str,
}

const fn country(
    en: &'static str,
    zh: &'static str,
    capital_en: &'static str,
    capital_zh: &'static str,
) -> Country {
    Country {
        en,
        zh,
        capital_en,
        capital_zh,
    }
}

pub const COUNTRIES: [Country; 24] = [
    country("France", "法国", "Paris", "巴黎"),
    country("Japan", "日本", "Tokyo", "东京"),
    country("China", "中国", "Beijing", "北京"),
    country("Italy", "意大利", "Rome", "罗马"),
    country("Egypt", "埃及", "Cairo", "开罗"),
    country("Spain", "西班牙", "Madrid", "马德里"),
    country("Canada", "加拿大", "Ottawa", "渥太华"),
    country("Germany", "德国", "Berlin", "柏林"),
    country("Russia", "俄罗斯", "Moscow", "莫斯科"),
    country("Kenya", "肯尼亚", "Nairobi", "内罗毕"),
    country("Peru", "秘鲁", "Lima", "利马"),
    country("Greece", "希腊", "Athens", "雅典"),
    country("India", "印度", "Delhi", "德里"),
    country("Mexico", "墨西哥", "Mexico City", "墨西哥城"),
    country("Brazil", "巴西", "Brasilia", "巴西利亚"),
    country("Norway", "挪威", "Oslo", "奥斯陆"),
    country("Thailand", "泰国", "Bangkok", "曼谷"),
    country("Turkey", "土耳其", "Ankara", "安卡拉"),
    country("Poland", "波兰", "Warsaw", "华沙"),
    country("Chile", "智利", "Santiago", "圣地亚哥"),
    country("Cuba", "古巴", "Havana", "哈瓦那"),
    country("Ireland", "爱尔兰", "Dublin", "都柏林"),
    country("Vietnam", "越南", "Hanoi", "河内"),
    country("Austria", "奥地利", "Vienna", "维也纳"),
];

/// (English, Chinese) colour names with a thing of that colour.
pub const COLOURS: [(&str, &str, &str, &str); 8] = [
    ("red", "红色", "apple", "苹果"),
    ("yellow", "黄色", "banana", "香蕉"),
    ("green", "绿色", "leaf", "叶子"),
    ("blue", "蓝色", "sky", "天空"),
    ("white", "白色", "snow", "雪"),
    ("black", "黑色", "coal", "煤"),
    ("orange", "橙色", "carrot", "胡萝卜"),
    ("purple", "紫色", "grape", "葡萄"),
];

pub const NAMES_EN: [&str; 16] = [
    "Lily", "Tom", "Mia", "Ben", "Anna", "Sam", "Lucy", "Max", "Emma", "Leo", "Zoe", "Jack",
    "Noah", "Ella", "Ryan", "Ivy",
];
pub const NAMES_ZH: [&str; 16] = [
    "小明", "小红", "小华", "小丽", "小刚", "小芳", "小军", "小雪", "小龙", "小梅", "小强", "小兰",
    "小杰", "小燕", "小东", "小静",
];
pub const DAYS_EN: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
pub const OBJECTS: [(&str, &str); 16] = [
    ("ball", "球"),
    ("kite", "风筝"),
    ("book", "书"),
    ("hat", "帽子"),
    ("cake", "蛋糕"),
    ("box", "盒子"),
    ("cup", "杯子"),
    ("key", "钥匙"),
    ("bag", "包"),
    ("lamp", "台灯"),
    ("pen", "笔"),
    ("shoe", "鞋"),
    ("chair", "椅子"),
    ("watch", "手表"),
    ("blanket", "毯子"),
    ("bottle", "瓶子"),
];

/// Invented people, whose facts no pretraining text holds: the knowledge base the model reads
/// through retrieval (`knowledge.txt`), never from its weights.
pub struct Person {
    pub en: String,
    pub zh: String,
    pub town_en: &'static str,
    pub town_zh: &'static str,
    pub job_en: &'static str,
    pub job_zh: &'static str,
    pub age: u32,
}

const SYLLABLES: [(&str, &str); 12] = [
    ("Ka", "卡"),
    ("Lo", "洛"),
    ("Mi", "米"),
    ("Ren", "仁"),
    ("Zu", "祖"),
    ("Ta", "塔"),
    ("Vi", "维"),
    ("No", "诺"),
    ("Sel", "塞"),
    ("Dar", "达"),
    ("Bo", "波"),
    ("Fen", "芬"),
];

pub const TOWNS: [(&str, &str); 10] = [
    ("Velmora", "维尔莫拉"),
    ("Ostrin", "奥斯特林"),
    ("Calder", "卡尔德"),
    ("Brisa", "布里萨"),
    ("Tamsk", "塔姆斯克"),
    ("Ulvany", "乌尔瓦尼"),
    ("Pellow", "佩洛"),
    ("Quenby", "昆比"),
    ("Rusk", "鲁斯克"),
    ("Haldon", "哈尔顿"),
];

pub const JOBS: [(&str, &str); 8] = [
    ("baker", "面包师"),
    ("doctor", "医生"),
    ("farmer", "农民"),
    ("teacher", "老师"),
    ("painter", "画家"),
    ("pilot", "飞行员"),
    ("singer", "歌手"),
    ("fisher", "渔夫"),
];

/// How many invented people the knowledge base and the grounded questions draw on.
pub const PEOPLE: usize = 64;
/// Invented people in all: those past [`PEOPLE`] appear only in the pretraining text's reading
/// exercises, never in the knowledge base or a question asked later.
pub const ALL_PEOPLE: usize = SYLLABLES.len() * SYLLABLES.len();

/// Person `i`. Names, towns, jobs and ages are drawn by a seeded shuffle rather than computed
/// from `i`: held-out people are every fourth index, and any formula of `i` gave them names that
/// started with syllables no training name had, and only two of the eight jobs.
pub fn person(i: usize) -> Person {
    let mut combos: Vec<usize> = (0..SYLLABLES.len() * SYLLABLES.len()).collect();
    let mut rng = crate::util::Rng::new(0x9e0_91e);
    for k in (1..combos.len()).rev() {
        let j = rng.below(k as u64 + 1) as usize;
        combos.swap(k, j);
    }
    let combo = combos[i % combos.len()];
    let (a, b) = (
        SYLLABLES[combo / SYLLABLES.len()],
        SYLLABLES[combo % SYLLABLES.len()],
    );
    let mut rng = crate::util::Rng::new(1_000 + i as u64);
    let town = TOWNS[rng.below(TOWNS.len() as u64) as usize];
    let job = JOBS[rng.below(JOBS.len() as u64) as usize];
    Person {
        en: format!("{}{}", a.0, b.0.to_lowercase()),
        zh: format!("{}{}", a.1, b.1),
        town_en: town.0,
        town_zh: town.1,
        job_en: job.0,
        job_zh: job.1,
        age: 20 + rng.below(60) as u32,
    }
}

/// Whether person `i` is left out of the knowledge base: questions about them must be answered
/// "the documents don't say".
pub fn absent_person(i: usize) -> bool {
    i % 8 == 7
}

impl Person {
    /// The person's passage in the knowledge base, in one language.
    pub fn document(&self, zh: bool) -> String {
        if zh {
            format!(
                "{}住在{}。{}今年{}岁。{}是{}。",
                self.zh, self.town_zh, self.zh, self.age, self.zh, self.job_zh
            )
        } else {
            format!(
                "{} lives in {}. {} is {} years old. {} works as a {}.",
                self.en, self.town_en, self.en, self.age, self.en, self.job_en
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_people_look_like_training_people() {
        let (held, train): (Vec<Person>, Vec<Person>) = (0..PEOPLE).map(|i| (i, person(i))).fold(
            (Vec::new(), Vec::new()),
            |(mut h, mut t), (i, p)| {
                if super::super::tasks::held_out_index(i) {
                    h.push(p)
                } else {
                    t.push(p)
                }
                (h, t)
            },
        );
        let names: std::collections::BTreeSet<&str> =
            held.iter().chain(&train).map(|p| p.en.as_str()).collect();
        assert_eq!(names.len(), PEOPLE, "names repeat");
        // Every held-out name starts with a syllable some training name starts with, and
        // held-out people hold at least half of the jobs.
        for p in &held {
            let first = &p.en[..2];
            assert!(train.iter().any(|t| t.en.starts_with(first)), "{}", p.en);
        }
        let jobs: std::collections::BTreeSet<&str> = held.iter().map(|p| p.job_en).collect();
        assert!(jobs.len() >= JOBS.len() / 2, "{jobs:?}");
    }
}
